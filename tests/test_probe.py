import pytest
import torch

from vitkd.errors import VitkdInputError
from vitkd.models import AttentionProbe, FeatureTap, create_model
from vitkd.models.probe import unfused_attention


@pytest.mark.parametrize("head", ["mean", 0, 1, "max"])
def test_probe_equals_cls_row_of_unfused_attention(head):
    torch.manual_seed(0)
    model = create_model("test_vit_patch4_16").eval()
    blocks = [0, 1]
    captured = {}
    hooks = [
        model.blocks[b].attn.register_forward_pre_hook(lambda m, inp, b=b: captured.__setitem__(b, inp[0]))
        for b in blocks
    ]
    probe = AttentionProbe(model, blocks, head=head)
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        model(x)
    maps = probe.maps()
    for b in blocks:
        full = unfused_attention(model.blocks[b].attn, captured[b])  # (B, H, N, N)
        row = full[:, :, 0, model.num_prefix_tokens :]
        ref = {"mean": row.mean(1), "max": row.amax(1)}.get(head) if isinstance(head, str) else row[:, head]
        assert maps[b].shape == (3, 4, 4)
        assert torch.allclose(maps[b].reshape(3, -1), ref, atol=1e-5)
    for h in hooks:
        h.remove()


def test_probe_keeps_fused_attention():
    model = create_model("test_vit_patch4_16")
    AttentionProbe(model, [1])
    assert all(blk.attn.fused_attn for blk in model.blocks)
    # the probe adds a hook on qkv only; the attention module itself is untouched
    assert len(model.blocks[1].attn.qkv._forward_hooks) == 1
    assert len(model.blocks[1].attn._forward_hooks) == 0


def test_probe_block_beyond_depth_is_a_clear_error():
    model = create_model("test_vit_patch4_16")
    with pytest.raises(VitkdInputError, match="block index 5 is beyond the model depth 2"):
        AttentionProbe(model, [5])
    with pytest.raises(VitkdInputError, match="beyond the model depth"):
        FeatureTap(model, [2])


def test_feature_tap_returns_block_outputs():
    model = create_model("test_vit_patch4_16").eval()
    tap = FeatureTap(model, [1])
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        feats = model.forward_features(x)
    # the last block's output, normed, is forward_features' output
    assert torch.allclose(model.norm(tap.features()[1]), feats, atol=1e-6)

"""Wild-data selection maths (Wang et al., "Attention Probe: Vision Transformer Distillation in the Wild", arXiv 2102.05958)."""

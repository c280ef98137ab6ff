"""Entry points that chain stages: the demos, the Fashion-MNIST benchmark and their run helpers."""

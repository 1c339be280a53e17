"""daaa: Deep Adversarial Attention Alignment for unsupervised domain adaptation (Kang et al., ECCV 2018)."""

__version__ = "0.1.0"

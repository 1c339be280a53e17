"""daaa: Deep Adversarial Attention Alignment for unsupervised domain adaptation (Kang et al., ECCV 2018).

The pieces of the method, usable in any PyTorch training loop:

* :func:`attention_map` -- Eq. 4, the normalised attention map of conv features;
* :class:`AttentionAlignmentLoss` -- L_AT, Eq. 5; :class:`FeatureRecorder` collects the conv features;
* :func:`em_loss`, :func:`confidence_mask`, :class:`PosteriorNetwork` -- L_EM and M_post, Eq. 8-11;
* :class:`daaa.cyclegan.CycleGAN` -- the adversarial data pairing of Sec. 3.1 (Eq. 1-3);
* :class:`daaa.trainers.adapt.DAAATrainer` -- the full objective, Eq. 12;
* :func:`predict` -- a trained run's class predictions for new images (``daaa predict``).
"""

from .attention import AttentionAlignmentLoss, FeatureRecorder, attention_map
from .em import PosteriorNetwork, confidence_mask, em_loss

__version__ = "0.1.0"

from .predict import predict  # noqa: E402  (after __version__, which the model files record)

__all__ = ["attention_map", "AttentionAlignmentLoss", "FeatureRecorder", "em_loss", "confidence_mask",
           "PosteriorNetwork", "predict", "__version__"]

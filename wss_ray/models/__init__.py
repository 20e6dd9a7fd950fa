"""Pure torch.nn.Modules; a checkpoint rebuilds them by class name + constructor kwargs."""
from wss_ray.models.classifier import Classifier
from wss_ray.models.open_unmix import UnmixSeparator, UnmixWaveSeparator
from wss_ray.models.separator import MaskSeparator
from wss_ray.models.tasnet import TasNetSeparator
from wss_ray.models.transcriptor import Transcriptor
from wss_ray.models.unet import UNetSeparator

MODEL_CLASSES = {c.__name__: c for c in (MaskSeparator, UnmixSeparator, UnmixWaveSeparator, UNetSeparator, TasNetSeparator,
                                         Transcriptor, Classifier)}

"""Pure torch.nn.Modules; a checkpoint rebuilds them by class name + constructor kwargs."""
from wss_ray.models.classifier import Classifier
from wss_ray.models.separator import MaskSeparator
from wss_ray.models.transcriptor import Transcriptor

MODEL_CLASSES = {c.__name__: c for c in (MaskSeparator, Transcriptor, Classifier)}

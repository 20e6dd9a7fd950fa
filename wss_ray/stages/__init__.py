"""The stages of the method and its comparison systems, by name."""
from wss_ray.stages.base import Recipe
from wss_ray.stages.baseline import BaselineRecipe
from wss_ray.stages.classifier import ClassifierRecipe
from wss_ray.stages.finetune import FinetuneRecipe
from wss_ray.stages.separator import SeparatorRecipe
from wss_ray.stages.supervised import SupervisedRecipe
from wss_ray.stages.transcriptor import TranscriptorRecipe

RECIPES: dict[str, Recipe] = {r.name: r for r in (
    TranscriptorRecipe(), SeparatorRecipe(), FinetuneRecipe(), ClassifierRecipe(), BaselineRecipe(),
    SupervisedRecipe())}

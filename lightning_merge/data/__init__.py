"""Stage 1 of the pipeline: data. GLUE text tasks and image sets, each with its task metrics."""

from lightning_merge.data.glue import GlueDataModule
from lightning_merge.data.glue_tasks import GLUE_TASKS, GlueTask, get_glue_task, stsb_to_bucket
from lightning_merge.data.image import ImageDataModule
from lightning_merge.data.masked_text import MaskedTextDataModule
from lightning_merge.data.shifts import SHIFTS, get_shift

__all__ = ["GLUE_TASKS", "SHIFTS", "GlueDataModule", "GlueTask", "ImageDataModule", "MaskedTextDataModule",
           "get_glue_task",
           "get_shift", "stsb_to_bucket"]

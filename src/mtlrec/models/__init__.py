"""Models: fused embeddings, user/item encoders, multi-task backbones and heads."""

from mtlrec.models.backbones import BACKBONES, CGC, PLE, Backbone, Experts, MMoE, OMoE, SharedBottom, Single
from mtlrec.models.embedding import FeatureEmbedding
from mtlrec.models.encoders import (
    MLP,
    GroupEncoder,
    MeanPooling,
    TargetAttention,
    TransformerPooling,
    missing_features,
)
from mtlrec.models.heads import PairHead, TaskHead, pair_features
from mtlrec.models.model import ITEM_ID, USER_ID, MultiTaskModel, RecModel, TaskIsolatedModel, build_model

__all__ = [
    "BACKBONES",
    "CGC",
    "ITEM_ID",
    "MLP",
    "PLE",
    "USER_ID",
    "Backbone",
    "Experts",
    "FeatureEmbedding",
    "GroupEncoder",
    "MMoE",
    "MeanPooling",
    "MultiTaskModel",
    "OMoE",
    "PairHead",
    "RecModel",
    "SharedBottom",
    "Single",
    "TargetAttention",
    "TaskHead",
    "TaskIsolatedModel",
    "TransformerPooling",
    "build_model",
    "missing_features",
    "pair_features",
]

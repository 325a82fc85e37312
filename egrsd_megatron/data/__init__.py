"""Datasets, prompt templates (student / teacher with privileged context), tokenizers, synthetic problems,
and evaluation-set preparation. Heavy imports (transformers, datasets) happen inside functions."""

from .dataset import DataError, Problem, ProblemSet, load_problems
from .sampler import PromptSampler
from .templates import PromptBuilder
from .tokenizer import load_tokenizer

__all__ = ["DataError", "Problem", "ProblemSet", "load_problems", "PromptSampler", "PromptBuilder", "load_tokenizer"]

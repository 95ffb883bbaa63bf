"""Evaluation: FID/FD in Inception, DINOv2 or CLIP space (legacy or clean resize), precision/recall,
KID, CLIP score, R-precision and diversity, behind one call (`evaluate`).

`clip2gan eval-fid` is a thin layer over `evaluate(EvalConfig) -> dict` (the JSON report),
`report_table(report)` (the terminal table) and `write_report(report, path)` (atomic write).
Modules by job: `config` (options and their checks), `evaluation` (the run), `report` (table, JSON,
versions), `images` (reading files), `feature_spaces` (extractors and resize conventions), `fid`
(Frechet distance, KID, real-folder cache), `precision_recall`, `clip_score` (CLIP score,
R-precision), `diversity`, `stats_file` (--stats / --save-stats). This file only re-exports.
"""
from __future__ import annotations

from .config import FEATURE_KINDS, GENERATION_PRIORS, EvalConfig, read_prompts_file, validate_config
from .evaluation import evaluate
from .feature_spaces import FID_MODES
from .report import package_versions, report_table, write_report

__all__ = ["EvalConfig", "evaluate", "report_table", "write_report", "read_prompts_file", "package_versions",
           "FEATURE_KINDS", "FID_MODES", "GENERATION_PRIORS", "validate_config"]

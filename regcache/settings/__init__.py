"""Typed settings: one place per field (type, default, choices, help, identity) for every action.

The command line is generated from these models (`regcache.cli.options`), pipeline blocks are
validated by them (`regcache.pipeline.blocks`), and a feature set's identity is made of the fields
they mark (`regcache.identity`). Importing them loads neither torch nor any extraction code.
"""
from .analysis import (ANALYSES, AttentionSettings, CachedAnalysis, FeaturemapSettings, NamedSets, NormsSettings,
                       TokenprobeSettings, VerifySettings)
from .base import Cli, Meta, Settings, SettingsError, cli, describe, fields, meta
from .data import (DemoSettings, GcSettings, ManifestCheckSettings, ManifestScanSettings, RmSettings,
                   ShardsFromFolderSettings, WeightsSettings)
from .distill import DistillSettings
from .extract import (PER_MODEL, Backbone, ExtractSettings, ListSettings, Preprocessing, Registers,
                      RegistersFindSettings, backbone, default_cache_root, split_spec, weights_dir)
from .presets import PRESETS, Preset
from .probe import (CachedSets, FewshotSettings, KnnSettings, ProbeSettings, ReportSettings, ScoreSettings, Scoring,
                    Training)
from .run import RunSettings

__all__ = ["DemoSettings", "GcSettings", "ManifestCheckSettings", "ManifestScanSettings", "RmSettings",
           "ShardsFromFolderSettings", "WeightsSettings", "DistillSettings", "ANALYSES", "PER_MODEL", "AttentionSettings", "Backbone", "CachedAnalysis", "CachedSets", "Cli", "ExtractSettings",
           "FeaturemapSettings", "FewshotSettings", "KnnSettings", "ListSettings", "Meta", "NamedSets",
           "NormsSettings", "PRESETS", "Preprocessing", "Preset", "ProbeSettings", "Registers",
           "RegistersFindSettings", "ReportSettings", "RunSettings", "ScoreSettings", "Scoring", "Settings",
           "SettingsError", "TokenprobeSettings", "Training", "VerifySettings", "backbone", "cli", "default_cache_root",
           "describe", "fields", "meta", "split_spec", "weights_dir"]

"""Named training recipes: blocks of params on top of a params file, compared by benchmarks/quality.py.

A recipe names what changes from the plain DCGAN (Radford et al. 2015: BatchNorm in D, the BCE
loss of the original GAN paper, no augmentation); everything else comes from the params file. To
train one, copy its block into params.yaml (the README lists them with their measured figures).
"""

from __future__ import annotations

from typing import Any

from ganflow.config import Config, config_from_dict

RECIPES: dict[str, dict[str, Any]] = {
    # the baseline: BatchNorm in D, non-saturating BCE
    "dcgan-bce": {
        "model.spectral_norm": False,
        "model.conditional": False,
        "train.loss": "bce",
        "train.augment": "none",
    },
    # spectral norm on D (no BatchNorm there), hinge loss (Miyato et al. 2018)
    "sn-hinge": {
        "model.spectral_norm": True,
        "model.conditional": False,
        "train.loss": "hinge",
        "train.augment": "none",
    },
    # + differentiable augmentation of every D input (Zhao et al. 2020), for small data sets
    "sn-hinge-diffaugment": {
        "model.spectral_norm": True,
        "model.conditional": False,
        "train.loss": "hinge",
        "train.augment": "diffaugment",
    },
    # DiffAugment alone on the baseline
    "dcgan-bce-diffaugment": {
        "model.spectral_norm": False,
        "model.conditional": False,
        "train.loss": "bce",
        "train.augment": "diffaugment",
    },
    # class-conditional G (conditional BatchNorm) and projection D when the data has labels
    "dcgan-bce-conditional": {
        "model.spectral_norm": False,
        "model.conditional": "auto",
        "train.loss": "bce",
        "train.augment": "none",
    },
    # + the mode-seeking term on G (Mao et al. 2019), which keeps the conditional G's samples of
    # one class apart: the project's params.yaml
    "dcgan-bce-conditional-ms": {
        "model.spectral_norm": False,
        "model.conditional": "auto",
        "train.loss": "bce",
        "train.augment": "none",
        "train.mode_seeking": 0.5,
    },
    "sn-hinge-conditional": {
        "model.spectral_norm": True,
        "model.conditional": "auto",
        "train.loss": "hinge",
        "train.augment": "none",
    },
    # residual G and D (SNGAN/BigGAN-style blocks), spectral norm and hinge, conditional on labels
    "resnet-sn-hinge-conditional": {
        "model.arch": "resnet",
        "model.spectral_norm": True,
        "model.conditional": "auto",
        "train.loss": "hinge",
        "train.augment": "none",
    },
}
for _recipe in RECIPES.values():  # every recipe names its architecture and its mode-seeking weight
    _recipe.setdefault("model.arch", "dcgan")
    _recipe.setdefault("train.mode_seeking", 0.0)


def apply_recipe(cfg: Config, name: str) -> Config:
    """A validated copy of ``cfg`` with the recipe's params set."""
    return with_params(cfg, RECIPES[name])


def with_params(cfg: Config, block: dict[str, Any]) -> Config:
    """A validated copy of ``cfg`` with a block of dotted params ("train.lr_g": ...) set."""
    values = cfg.to_dict()
    for dotted, value in block.items():
        section, key = dotted.split(".")
        values[section][key] = value
    out = config_from_dict(values, cfg.root)
    out._source = cfg._source
    return out

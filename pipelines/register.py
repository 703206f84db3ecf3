"""DVC stage `register`: register paths.generator in the MLflow model registry as
registry.model_name; alias `challenger` on the new version, `champion` on the best version
measured with the same encoder and reference (see ganflow/registry.py). Writes
paths.registry (registry/model_version.json).

    python pipelines/register.py [--params params.yaml]
"""

from __future__ import annotations

import sys

from ganflow.config import Config
from ganflow.registry import register
from ganflow.stage import stage_main


def stage(cfg: Config) -> None:
    record = register(cfg)
    if record["copying_flagged"]:
        verdict = "challenger only: the copy detector flagged it (copying_reasons in metrics/eval.json)"
    elif record["promoted"]:
        verdict = "promoted to champion"
    elif "champion" in record["aliases"]:
        verdict = "already the champion"
    elif record["champion_version"] is not None:
        verdict = (
            f"challenger only (champion: version {record['champion_version']}, validation fd_domain "
            f"{record['champion_fd_domain']:.4g}, measured the same way; a challenger must beat it by more "
            "than the two versions' combined spread)"
        )
    else:
        verdict = "challenger only (every version measured this way is flagged by the copy detector)"
    again = "" if record["created"] else " (already registered: same weights)"
    print(
        f"{record['name']} version {record['version']}{again}: validation fd_domain "
        f"{record['validation_fd_domain']:.4g} ± {record['validation_fd_domain_sd']:.2g}, {verdict}; "
        f"aliases {', '.join(record['aliases'])} -> {cfg.paths.registry}"
    )


def main(argv: list[str] | None = None) -> int:
    return stage_main(__doc__, stage, argv)


if __name__ == "__main__":
    sys.exit(main())

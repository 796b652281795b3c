"""``brainfm-evaluate ckpt=<checkpoint or run dir>``: subject re-identification (Rank-1, mAP) of
the pretrained model, the same architecture randomly initialised, and FC fingerprinting, at
several window lengths. Writes ``metrics.json`` and ``reid.png`` and prints a table.
``protocol=few_subject``: decoding accuracy against the number of training subjects
(:mod:`brainfm.eval.few_subject`; ``few_subject.json|csv|png``)."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from brainfm.cli.common import exit_on_brainfm_error, tidy_logging
from brainfm.config import config_dir


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    tr = report["data"].get("tr")
    at = f" at TR {tr:g} s" if isinstance(tr, (int, float)) else ""
    table = Table(title=f"Subject re-identification ({report['data']['n_subjects']} subjects{at}; "
                  f"gallery: {report['protocol']['gallery']}, queries: {report['protocol']['queries']})")
    table.add_column("window")
    names = list(report["results"])
    for name in names:
        table.add_column(f"{name}\nRank-1 / mAP", justify="right")
    table.add_column("chance\nRank-1", justify="right")
    first = report["results"][names[0]]
    for length in first:
        tr = report["data"]["tr"]
        row = [f"{length} TRs ({int(length) * tr:.0f} s)" if tr else f"{length} TRs"]
        row += [f"{report['results'][n][length]['rank1']:.3f} / {report['results'][n][length]['mAP']:.3f}" for n in names]
        row.append(f"{first[length]['rank1_chance']:.3f}")
        table.add_row(*row)
    Console().print(table)
    if "probe" in report:
        probe = Table(title=f"{report['data']['n_subjects']}-way subject linear probe (fit on gallery windows, "
                      "scored on query windows): accuracy / balanced accuracy")
        probe.add_column("window")
        for name in names:
            probe.add_column(name, justify="right")
        probe.add_column("chance", justify="right")
        for length in first:
            row = [f"{length} TRs"]
            row += [f"{report['probe'][n][length]['acc']:.3f} / {report['probe'][n][length]['balanced_acc']:.3f}" for n in names]
            row.append(f"{1 / report['data']['n_subjects']:.3f}")
            probe.add_row(*row)
        Console().print(probe)


def run(cfg: DictConfig) -> dict | None:
    protocol = cfg.get("protocol") or "reidentification"
    if protocol == "few_subject":  # decoding accuracy vs training subjects (brainfm.eval.few_subject)
        from brainfm.eval.few_subject import run_from_config

        return run_from_config(cfg)
    if protocol != "reidentification":
        from brainfm.errors import ConfigError

        raise ConfigError(f"protocol={protocol!r} must be 'reidentification' or 'few_subject'")
    from brainfm.eval.protocol import (
        plot_reidentification,
        run_reidentification,
        write_json,
    )
    from brainfm.runs import find_checkpoint

    ckpt = find_checkpoint(cfg.ckpt)
    report = run_reidentification(
        ckpt, window_lengths=list(cfg.window_lengths), gallery_fraction=float(cfg.gallery_fraction),
        stride=cfg.stride, batch_size=int(cfg.batch_size), seed=int(cfg.seed), data_path=cfg.data_path,
        baselines=list(cfg.baselines), probe=bool(cfg.get("probe", True)), trainer=cfg.get("trainer"),
        gallery_runs=cfg.get("gallery_runs"), query_runs=cfg.get("query_runs"),
        data_overrides=OmegaConf.to_container(cfg.data, resolve=True) if cfg.get("data") else None,
        run_fraction=float(cfg.get("run_fraction", 1.0)),
        compare=OmegaConf.to_container(cfg.compare, resolve=True) if cfg.get("compare") else None,
    )
    if report is None:  # not the global rank 0: its windows were embedded for rank 0's report
        return None
    out = Path(cfg.out_dir) if cfg.out_dir else ckpt.parent.parent / "eval"
    out.mkdir(parents=True, exist_ok=True)
    report["config"] = OmegaConf.to_container(cfg, resolve=True)
    write_json(out / "metrics.json", report)
    plot_reidentification(report, out / "reid.png")
    print_table(report)
    print(f"wrote {out / 'metrics.json'} and {out / 'reid.png'}")
    return report


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="evaluate")
def _main(cfg: DictConfig) -> None:
    tidy_logging()
    with exit_on_brainfm_error("brainfm-evaluate"):
        run(cfg)


def main() -> None:
    _main()


if __name__ == "__main__":
    main()

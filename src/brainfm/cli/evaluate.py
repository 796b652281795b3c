"""``brainfm-evaluate ckpt=<checkpoint or run dir>``: subject re-identification (Rank-1, mAP) of
the pretrained model, the same architecture randomly initialised, and FC fingerprinting, at
several window lengths. Writes ``metrics.json`` and ``reid.png`` and prints a table.
``protocol=few_subject``: decoding accuracy against the number of training subjects
(:mod:`brainfm.eval.few_subject`; ``few_subject.json|csv|png``). ``protocol=logistic``: Brainmarks' logistic
protocol on a labelled store, the checkpoint beside the FC baseline (``model=fc``: FC alone, no checkpoint;
:mod:`brainfm.eval.logistic`; ``metrics.json``). ``protocol=probe``: Brainmarks' probe protocol, a grid of heads on
frozen embeddings (:mod:`brainfm.eval.brainmarks_probe`; settings in ``probe_heads``)."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from brainfm.cli.common import exit_on_brainfm_error
from brainfm.config import config_dir
from brainfm.errors import ConfigError
from brainfm.logs import tidy_logging

# brainfm's library (torch, Lightning) is imported inside the command's functions, not here: `--help` and a
# config error then return in under a second instead of 5-13 s (python -X importtime -m brainfm.cli.train --help, 2 busy
# cores). The entry points are the one place where brainfm imports sit in functions (docs/architecture.md).

#: row labels of the built-in methods (other rows: the ``compare`` names)
LABELS = {"pretrained": "pretrained", "random_init": "random init (same model)", "fc_fingerprint": "FC fingerprinting"}


def print_table(report: dict) -> None:
    """One row per method (the checkpoint, its initialisation, FC fingerprinting, compared runs), one column
    per window length: Rank-1 / mAP; then the subject probe, if it ran."""
    from rich.console import Console
    from rich.table import Table

    tr = report["data"].get("tr")
    at = f" at TR {tr:g} s" if isinstance(tr, (int, float)) else ""
    names = list(report["results"])
    lengths = list(report["results"][names[0]])
    first = report["results"][names[0]]

    def window(length: str) -> str:
        return f"{length} TRs ({int(length) * tr:.0f} s)" if isinstance(tr, (int, float)) and tr else f"{length} TRs"

    def show(title: str, results: dict, cell, chance: list[str]) -> None:
        # titles as plain lines: rich wraps a title at the table's width
        print(title)
        table = Table()
        table.add_column("method")
        for length in lengths:
            table.add_column(window(length), justify="right")
        for n in names:
            table.add_row(LABELS.get(n, n), *(cell(results[n][k]) for k in lengths))
        table.add_row("chance", *chance)
        Console().print(table)

    show(f"Subject re-identification ({report['data']['n_subjects']} subjects{at}; gallery: "
         f"{report['protocol']['gallery']}, queries: {report['protocol']['queries']}): Rank-1 / mAP",
         report["results"], lambda r: f"{r['rank1']:.3f} / {r['mAP']:.3f}",
         [f"{first[k]['rank1_chance']:.3f} / {first[k]['mAP_chance']:.3f}" for k in lengths])
    if "probe" in report:
        show(f"{report['data']['n_subjects']}-way subject linear probe (fit on gallery windows, scored on query "
             "windows): accuracy / balanced accuracy", report["probe"],
             lambda r: f"{r['acc']:.3f} / {r['balanced_acc']:.3f}",
             [f"{1 / report['data']['n_subjects']:.3f}" for _ in lengths])


def run(cfg: DictConfig) -> dict | None:
    from brainfm.eval.few_subject import run_from_config
    from brainfm.eval.protocol import plot_reidentification, run_reidentification, write_json
    from brainfm.runs import find_checkpoint

    protocol = cfg.get("protocol") or "reidentification"
    if protocol == "few_subject":  # decoding accuracy vs training subjects (brainfm.eval.few_subject)
        return run_from_config(cfg)
    if protocol in ("logistic", "probe"):
        return run_labelled(cfg, protocol)
    if protocol != "reidentification":
        raise ConfigError(f"protocol={protocol!r} must be 'reidentification', 'few_subject', 'logistic' or 'probe'")
    _refuse_model(cfg, protocol)

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


def _model_choice(cfg: DictConfig) -> str | None:
    """The ``model=<name>`` given on the command line (Hydra's choice of the ``model`` group), or None."""
    if cfg.get("model") is None:
        return None
    try:
        from hydra.core.hydra_config import HydraConfig

        choice = HydraConfig.get().runtime.choices.get("model")
        if choice:
            return str(choice)
    except ValueError:  # composed without @hydra.main (tests, compose API)
        pass
    target = str(OmegaConf.select(cfg, "model._target_", default="") or "")
    return "fc" if target == "brainfm.models.fc.FunctionalConnectivity" else target.rsplit(".", 1)[-1] or "model"


def _refuse_model(cfg: DictConfig, protocol: str) -> None:
    if _model_choice(cfg) is not None:
        raise ConfigError(f"model={_model_choice(cfg)} is for protocol=logistic or probe (model=fc: the FC baseline alone); "
                          f"protocol={protocol} evaluates ckpt=<run dir> and carries FC itself. Fix: drop model=")


def run_labelled(cfg: DictConfig, name: str = "logistic") -> dict | None:
    """``protocol=logistic`` (:func:`brainfm.eval.logistic.run_logistic` with ``cfg.logistic``) or ``protocol=probe``
    (:func:`brainfm.eval.brainmarks_probe.run_probe` with ``cfg.probe_heads``): prints the table and writes
    ``metrics.json`` (atomically) to ``out_dir`` (default: ``<run>/eval/<protocol>_<target>`` of the checkpoint,
    ``outputs/evaluate/<protocol>_<data>_<target>`` for ``model=fc``).

    Raises:
        ConfigError: ``model=`` other than ``fc``; ``model=fc`` with a checkpoint; neither; as the protocol's
            ``run_*``.
    """
    from brainfm.eval import brainmarks_probe, logistic
    from brainfm.eval.protocol import write_json
    from brainfm.runs import find_checkpoint, run_dir_of


    if name == "probe":
        protocol, print_report = brainmarks_probe.run_probe, brainmarks_probe.print_table
        section, keys = "probe_heads", ("atlas", "split", "window_length", "fc_length", "fc_classifier")
    else:
        protocol, print_report = logistic.run_logistic, logistic.print_table
        section, keys = "logistic", ("atlas", "split", "window_length", "fc_length", "representation")
    choice = _model_choice(cfg)
    has_ckpt = not OmegaConf.is_missing(cfg, "ckpt") and cfg.ckpt is not None
    if choice is not None and choice != "fc":
        raise ConfigError(f"model={choice}: protocol={name} evaluates a trained checkpoint (ckpt=<run dir>) or, "
                          f"without one, the FC baseline alone (model=fc). Fix: ckpt=<run dir of a model={choice} run>")
    if choice == "fc" and has_ckpt:
        raise ConfigError("model=fc is the FC baseline alone, without a checkpoint, but ckpt= is given (every table "
                          "already carries FC beside the checkpoint). Fix: drop model=fc, or drop ckpt=")
    if choice is None and not has_ckpt:
        raise ConfigError(f"protocol={name} needs ckpt=<run dir or .ckpt> (the model, beside the FC baseline), or "
                          "model=fc for the FC baseline alone, with data_path=<labelled store> target=<label>")
    settings = OmegaConf.to_container(cfg[section], resolve=True) if cfg.get(section) else {}
    options = {k: settings.pop(k) for k in keys if k in settings}
    ckpt = find_checkpoint(cfg.ckpt) if has_ckpt else None
    if cfg.out_dir:
        out = Path(cfg.out_dir)
    elif ckpt is not None:
        out = run_dir_of(ckpt) / "eval" / f"{name}_{cfg.target}"
    else:
        out = Path("outputs") / "evaluate" / f"{name}_{Path(str(cfg.data_path or 'data')).name}_{cfg.target}"
    batch = {"inference_batch_size" if name == "probe" else "batch_size": int(cfg.batch_size)}
    report = protocol(ckpt, cfg.data_path, cfg.get("target"), **batch,
                      trainer=cfg.get("trainer"), shard_dir=out / f".inference-{name}", **options, **settings)
    if report is None:  # not the global rank 0
        return None
    out.mkdir(parents=True, exist_ok=True)
    config = OmegaConf.to_container(cfg, resolve=False)
    config["model"] = choice  # the group's config interpolates the training data (${data.n_rois})
    report["config"] = config
    write_json(out / "metrics.json", report)
    print_report(report)
    print(f"wrote {out / 'metrics.json'}")
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

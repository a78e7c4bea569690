"""ZeroShotEval: lm-eval 0.4 zero-shot accuracy of the in-memory pruned model, at fit end."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from lightning.pytorch import Callback

from besa_pl.compat import data_unreachable_errors
from besa_pl.console import console, third_party_output
from besa_pl.errors import BesaError, at_least
from besa_pl.eval.zero_shot_tasks import TASKS, local_task_configs
from besa_pl.offline import hub_reachable, resolve_data_dir


def task_means(tasks: dict[str, dict[str, float]]) -> dict[str, float | None]:
    """The tasks' mean acc, and mean acc_norm (a task without acc_norm, boolq or winogrande, counts its acc).

    Papers differ in which of the two they average for piqa / arc / hellaswag, so both are reported.
    """
    accs = [scores["acc"] for scores in tasks.values() if "acc" in scores]
    norms = [scores.get("acc_norm", scores["acc"]) for scores in tasks.values() if "acc" in scores]
    return {
        "mean_acc": sum(accs) / len(accs) if accs else None,
        "mean_acc_norm": sum(norms) / len(norms) if norms else None,
    }


def item_scores(samples: list[dict]) -> dict[str, str]:
    """Each item's acc (and acc_norm) as a string of 0s and 1s in document order: what a paired
    comparison of two models on the same items needs (`python -m besa_pl.eval.zero_shot_compare`)."""
    ordered = sorted(samples, key=lambda sample: sample["doc_id"])
    metrics = [metric for metric in ("acc", "acc_norm") if ordered and metric in ordered[0]]
    return {metric: "".join("1" if sample[metric] else "0" for sample in ordered) for metric in metrics}


class ZeroShotEval(Callback):
    """Zero-shot accuracy (acc, and acc_norm where the task has it) through lm-eval's HFLM; the
    results also keep every item's score, so two runs can be compared item by item.

    Args:
        tasks: any of piqa, boolq, hellaswag, winogrande, arc_easy, arc_challenge.
        limit: items per task (quick runs); None = the whole split.
        batch_size: lm-eval batch size.
        max_length: context limit (2048, as in the paper's wrapper).
        data_dir: local data folder; else the data module's, else BESA_DATA_DIR, else the hub.
    """

    def __init__(
        self,
        tasks: list[str] = TASKS,
        limit: int | None = None,
        batch_size: int = 16,
        max_length: int = 2048,
        data_dir: str | None = None,
    ) -> None:
        unknown = [task for task in tasks if task not in TASKS]
        if unknown:
            raise BesaError(f"ZeroShotEval.tasks: unknown task(s) {', '.join(unknown)}; use {', '.join(TASKS)}")
        at_least("ZeroShotEval.limit", limit, 1)
        at_least("ZeroShotEval.batch_size", batch_size, 1)
        at_least("ZeroShotEval.max_length", max_length, 16)
        self.tasks = list(tasks)
        self.limit = limit
        self.batch_size = batch_size
        self.max_length = max_length
        self.data_dir = data_dir

    def on_fit_end(self, trainer, pruner) -> None:
        if not trainer.is_global_zero:  # under DDP the evaluation runs once, on rank 0
            return
        logging.getLogger("lm_eval").setLevel(logging.ERROR)  # per-task chatter; results are printed below
        from lm_eval.tasks import TaskManager

        folder = resolve_data_dir(self.data_dir or getattr(trainer.datamodule, "data_dir", None))
        manager = TaskManager()
        with tempfile.TemporaryDirectory(prefix="besa-zeroshot-") as work:  # the tasks' converted files
            if folder is not None:
                specs, skipped = local_task_configs(manager, self.tasks, folder, Path(work))
            elif hub_reachable():
                specs, skipped = list(self.tasks), {}
            else:
                reason = "no data folder (data.data_dir / BESA_DATA_DIR) and the Hugging Face hub cannot be reached"
                specs, skipped = [], {name: reason for name in self.tasks}
            for name, reason in skipped.items():
                console.print(f"[yellow]zero-shot {name} skipped:[/] {reason}")
            results = {"skipped": skipped, "tasks": {}, "versions": {}, "items": {}, "limit": self.limit}
            model, device = self.load_model(pruner, specs, skipped)
            if model is not None:
                self.evaluate(model, device, pruner.tokenizer, specs, manager, results)
        results.update(task_means(results["tasks"]))
        pruner.results["zero_shot"] = results
        if trainer.logger is not None:
            flat = {f"zero_shot/{t}/{k}": v for t, s in results["tasks"].items() for k, v in s.items()}
            trainer.logger.log_metrics(flat)

    @staticmethod
    def load_model(pruner, specs: list, skipped: dict[str, str]):
        """(model, device), or (None, None) when there is nothing to evaluate or the model does not fit
        even with offloading (the pruning result stands; every task is reported as skipped)."""
        import torch

        if not specs:
            return None, None
        try:
            return pruner.evaluation_model(offload=True)
        except (MemoryError, torch.cuda.OutOfMemoryError, OSError) as error:  # OSError: offload disk full
            for spec in specs:
                skipped[task_name(spec)] = (
                    f"the model could not be loaded for evaluation ({type(error).__name__}: {error})"
                )
                console.print(f"[yellow]zero-shot {task_name(spec)} skipped:[/] {skipped[task_name(spec)]}")
            return None, None

    def evaluate(self, model, device, tokenizer, specs: list, manager, results: dict) -> None:
        """Each task in turn; a task whose data cannot be fetched is skipped with its reason, any other
        error (a broken lm-eval, a bug) ends the run."""
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        with third_party_output():
            lm = HFLM(
                pretrained=model,
                tokenizer=tokenizer,
                batch_size=self.batch_size,
                max_length=self.max_length,
                device=str(device),
            )
        for spec in specs:
            name = task_name(spec)
            try:
                with third_party_output():  # datasets' and lm-eval's bars
                    out = simple_evaluate(
                        model=lm,
                        tasks=[spec],
                        task_manager=manager,
                        limit=self.limit,
                        bootstrap_iters=0,
                        log_samples=True,
                        verbosity="ERROR",
                    )
            except data_unreachable_errors() as error:  # offline hub, missing file: report, never drop silently
                results["skipped"][name] = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:160]}"
                console.print(f"[yellow]zero-shot {name} skipped:[/] {results['skipped'][name]}")
                continue
            metrics = out["results"][name]
            scores = {
                key.split(",")[0]: value
                for key, value in metrics.items()
                if key.split(",")[0] in ("acc", "acc_norm") and isinstance(value, float)
            }
            results["tasks"][name] = scores
            results["versions"][name] = out.get("versions", {}).get(name)
            results["items"][name] = item_scores(out.get("samples", {}).get(name, []))
            console.print(f"zero-shot {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))


def task_name(spec) -> str:
    """A task given by name (from the hub) or as a local config."""
    return spec if isinstance(spec, str) else spec["task"]

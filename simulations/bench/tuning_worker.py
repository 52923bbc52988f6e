"""One configuration of the `tuning` benchmark, in its own process (config JSON on stdin).

mode "plain": dense LoRA over the full depth (edgecore.finetune.train). mode "adaptive":
window tuning at adaptively chosen exits (edgecore.tuning), on a dense or compressed base.
Prints one JSON object: step time, peak RSS above the runtime floor (RSS after the imports),
test accuracy after the steps, plus for adaptive
runs the estimator's prediction and early-exit inference against full depth.
"""

from __future__ import annotations

import json
import sys

from edgecore import data, measure, models  # the imports set the runtime floor
from edgecore.encoding import Encoder
from edgecore.evaluate import evaluate
from edgecore.allocator import limit_heap_fragmentation
from edgecore.finetune import LoraSettings, TrainSettings, add_lora, train
from edgecore.tuning import adaptive
from edgecore.tuning.voting import exit_scores, predict_early


def main() -> None:
    config = json.loads(sys.stdin.read())
    measure_heap = limit_heap_fragmentation()  # every configuration alike: freed memory goes back to the OS
    floor_mb = measure.rss_mb()
    dataset = data.load("bbc", seed=0)
    model, tokenizer = models.load(config["model"])
    encoder = Encoder(tokenizer, dataset, max_len=config["seq_len"])
    lora = LoraSettings()
    model = add_lora(model, lora)
    settings = TrainSettings(steps=config["steps"], batch_size=config["batch_size"], seq_len=config["seq_len"],
                             lr=config["lr"], precision="fp32")
    test = dataset.test[: config["eval_samples"]]
    validation = dataset.validation[: config["vote_samples"]]
    result: dict = {"config": config["name"], "floor_mb": floor_mb, "heap_limited": measure_heap}

    if config["mode"] == "plain":
        report = train(model, encoder, dataset.train, settings, progress=False)
        after = evaluate(model, encoder, test, precision="fp32", progress=False)
        result["test_accuracy"] = after["accuracy"]
    else:
        options = adaptive.AdaptiveSettings(window=config.get("window"), budget_mb=config.get("budget_mb"))
        exits, depth = adaptive.prepare(model, options, settings, lora)
        tuned = adaptive.tune(model, exits, depth, encoder, dataset.train, validation, settings, progress=False)
        report = tuned.report
        result.update(window=depth.layers, estimate_mb=depth.estimate_mb, exits=list(exits.layers),
                      exit_steps=tuned.summary()["exit_steps"], votes=tuned.votes)
        by_exit = exit_scores(model, exits, encoder, test)
        result["test_accuracy_by_exit"] = {str(e): s["accuracy"] for e, s in by_exit.items()}
        result["test_accuracy"] = by_exit[exits.layers[-1]]["accuracy"]
        infer = test[: config["inference_samples"]]
        result["inference"] = {
            "full_depth": predict_early(model, exits, encoder, infer, [0.0] * (len(exits.layers) - 1) + [1.0], 1.0),
            "voting_full": predict_early(model, exits, encoder, infer, tuned.votes, 1.0),
            "early_exit": predict_early(model, exits, encoder, infer, tuned.votes, config["threshold"]),
        }
    result.update(
        step_s=report.mean_step_s, train_s=report.train_s, peak_mb=report.peak_rss_mb,
        peak_above_floor_mb=report.peak_rss_mb - floor_mb, first_loss=report.steps[0].loss,
        final_loss=report.final_loss, steps=len(report.steps),
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()

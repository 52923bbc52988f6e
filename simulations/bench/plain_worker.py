"""One configuration of the `plain` benchmark, in its own process (config JSON on stdin)."""

from __future__ import annotations

import json
import sys

from edgecore import data, measure, models  # the imports set the runtime floor
from edgecore.encoding import Encoder
from edgecore.evaluate import evaluate
from edgecore.finetune import LoraSettings, TrainSettings, add_lora, train


def main() -> None:
    config = json.loads(sys.stdin.read())
    floor_mb = measure.rss_mb()
    dataset = data.load(config["data"], seed=0)
    model, tokenizer = models.load(config["model"])
    encoder = Encoder(tokenizer, dataset, max_len=config["seq_len"])
    model = add_lora(model, LoraSettings())
    settings = TrainSettings(
        steps=config["steps"], batch_size=config["batch_size"], seq_len=config["seq_len"],
        precision=config["precision"],
    )
    report = train(model, encoder, dataset.train, settings, progress=False)
    result = {
        "step_s": report.mean_step_s,
        "peak_mb": report.peak_rss_mb,
        "floor_mb": floor_mb,
        "peak_above_floor_mb": report.peak_rss_mb - floor_mb,
        "first_loss": report.steps[0].loss,
        "final_loss": report.final_loss,
        "steps": len(report.steps),
    }
    if config.get("eval_samples"):
        metrics = evaluate(model, encoder, dataset.test[: config["eval_samples"]], precision=config["precision"], progress=False)
        result["test_accuracy"] = metrics.get("accuracy")
        result["test_loss"] = metrics["loss"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()

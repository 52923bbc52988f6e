"""`python -m edgecore COMMAND`: the device-side pipeline from the command line.

Each command imports what it runs inside its own function: `--help` and a typo answer in a
fraction of a second instead of after torch and transformers load (the only lazy imports
in the project; tests/test_architecture.py allows them for command-line entry points only).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from edgecore.errors import EdgecoreError

log = logging.getLogger("edgecore")


def _finetune_parser(sub) -> None:
    from edgecore.finetune import PRECISIONS, LoraSettings, TrainSettings

    lora, train = LoraSettings(), TrainSettings()
    p = sub.add_parser(
        "finetune",
        help="plain LoRA fine-tuning with evaluation before and after",
        description="Fine-tune LoRA adapters on a dense base model (every layer, full-depth "
        "backprop), evaluate on the held-out test split before and after, and save the adapter "
        "in PEFT format with per-step metrics in a run folder.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m, tiny-micro, tiny-5m, or a local Hugging Face model folder")
    p.add_argument("--data", default="bbc", help="bbc, shakespeare, shakespeare:role, or a JSONL file / folder of {text} or {prompt,response} lines")
    p.add_argument("--steps", type=int, default=train.steps, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=train.batch_size, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=train.seq_len, help="maximum tokens per sequence (long texts are cut, answers kept)")
    p.add_argument("--lr", type=float, default=train.lr, help="peak learning rate (linear warm-up, cosine decay to lr/10)")
    p.add_argument("--warmup-steps", type=int, default=train.warmup_steps, help="linear warm-up steps")
    p.add_argument("--precision", choices=PRECISIONS, default=train.precision, help="auto = with --device, the device profile's; else bf16 autocast where this CPU runs bf16 natively (avx512_bf16/AMX), fp32 elsewhere")
    p.add_argument("--lora-r", type=int, default=lora.r, help="LoRA rank")
    p.add_argument("--lora-alpha", type=int, default=lora.alpha, help="LoRA alpha (scaling = alpha / r)")
    p.add_argument("--lora-dropout", type=float, default=lora.dropout, help="LoRA dropout")
    p.add_argument("--targets", default=",".join(lora.targets), help="comma-separated module names that get LoRA")
    p.add_argument("--seed", type=int, default=train.seed, help="seed for the data split, batch order and LoRA init")
    p.add_argument("--num-partitions", type=int, default=1, help="split the training data into this many client partitions ...")
    p.add_argument("--partition-id", type=int, default=0, help="... and train on this one (0-based)")
    p.add_argument("--partition", default="iid", help="partition scheme: iid, natural, or dirichlet:ALPHA")
    p.add_argument("--eval-split", choices=("test", "validation"), default="test", help="held-out split to evaluate on")
    p.add_argument("--eval-samples", type=int, default=0, help="evaluate on the first N samples of the split (0 = all)")
    p.add_argument("--eval-batch-size", type=int, default=16, help="sequences per evaluation forward pass")
    p.add_argument("--no-eval-before", action="store_true", help="skip the evaluation before tuning")
    p.add_argument("--out", type=Path, default=None, help="run folder (default runs/finetune-TIMESTAMP); must not hold a run already")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    a = p.add_argument_group("adaptive depth", "train windows of layers ending at early exits instead of the full depth")
    a.add_argument("--adaptive", action="store_true", help="adaptive-depth tuning: window LoRA + exit adapters, voting, early-exit inference")
    a.add_argument("--device", default=None, help="device profile (name, TOML file or 'local'): its memory budget sets the window depth")
    a.add_argument("--budget-mb", type=float, default=None, help="memory budget of the job in MiB (overrides --device's)")
    a.add_argument("--exits", default="quarters", help="exit layers: 'quarters', a count, or indices like 7,15,22,29")
    a.add_argument("--exit-rank", type=int, default=8, help="rank of each exit adapter")
    a.add_argument("--window", type=int, default=None, help="fixed window depth (default: the deepest that fits the budget)")
    a.add_argument("--threshold", type=float, default=0.9, help="early-exit inference stops once the combined confidence reaches this")
    p.set_defaults(handler=_finetune)


def _check_out(out: Path | None) -> Path:
    out = out or Path("runs") / time.strftime("finetune-%Y%m%d-%H%M%S")
    if (out / "summary.json").exists():
        raise EdgecoreError(f"--out {out} already holds a run (summary.json); choose another folder or remove it")
    return out


def _finetune(args) -> None:
    from edgecore import data, models
    from edgecore.encoding import Encoder
    from edgecore.evaluate import evaluate
    from edgecore.finetune import LoraSettings, TrainSettings, add_lora, resolve_precision, train

    # Check every input before the slow work starts, so a typo costs nothing.
    lora = LoraSettings(args.lora_r, args.lora_alpha, args.lora_dropout, tuple(t for t in args.targets.split(",") if t))
    settings = TrainSettings(
        steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
        warmup_steps=args.warmup_steps, precision=args.precision, seed=args.seed,
    )
    out = _check_out(args.out)
    adaptive_settings = _adaptive_settings(args)
    data.parse_partition_spec(args.partition)  # a typo fails before the data loads
    dataset = data.load(args.data, seed=args.seed)
    train_samples = data.share(dataset.train, args.num_partitions, args.partition_id, args.partition, seed=args.seed)
    held_out = getattr(dataset, args.eval_split)
    if args.eval_samples:
        held_out = held_out[: args.eval_samples]

    started = time.perf_counter()
    dev = _device_model(args, lora, settings) if args.device else None
    if dev is None:
        model, tokenizer = models.load(args.model, seed=args.seed)
        precision = resolve_precision(settings.precision)
    else:  # the device's own base (compressed if its budget needs it), LoRA, exits and window
        model, tokenizer, precision = dev.model, dev.tokenizer, dev.compute_precision
        settings = replace(settings, precision=precision)
    encoder = Encoder(tokenizer, dataset, max_len=settings.seq_len)
    print(f"model {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"{model.config.num_hidden_layers} layers, loaded in {time.perf_counter() - started:.1f} s; precision {precision}")
    print(f"data {dataset.name}: {len(train_samples)} training samples, {len(held_out)} {args.eval_split} samples")

    progress = not args.quiet
    evals = {}
    if not args.no_eval_before:
        evals["before"] = evaluate(model, encoder, held_out, batch_size=args.eval_batch_size, precision=precision, progress=progress)
        print("before: " + _metrics_line(evals["before"]))

    if dev is None:
        model = add_lora(model, lora)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "steps.jsonl").open("w") as steps_file:
        def record(step):
            steps_file.write(json.dumps(asdict(step)) + "\n")
            steps_file.flush()
        if adaptive_settings is not None:
            return _finetune_adaptive(args, model, encoder, dataset, train_samples, held_out, settings,
                                      adaptive_settings, lora, evals, out, record, started, dev)
        report = train(model, encoder, train_samples, settings, progress=progress, on_step=record)
    print(f"trained {len(report.steps)} steps in {report.train_s:.1f} s: {report.mean_step_s:.2f} s/step, "
          f"loss {report.steps[0].loss:.3f} -> {report.final_loss:.3f}, peak RSS {report.peak_rss_mb:.0f} MB")
    model.save_pretrained(out / "adapter")

    evals["after"] = evaluate(model, encoder, held_out, batch_size=args.eval_batch_size, precision=precision, progress=progress)
    print("after:  " + _metrics_line(evals["after"]))
    summary = {
        "model": args.model, "data": args.data, "eval_split": args.eval_split,
        "settings": {"lora": asdict(lora), "train": asdict(settings)},
        "train": report.summary(), "eval": evals, "adapter": str(out / "adapter"),
        "wall_s": time.perf_counter() - started,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"run folder: {out} (adapter/, steps.jsonl, summary.json)")


def _device_model(args, lora, settings):
    """--device: the model made ready for that device by edgecore.device.prepare (its budget, or --budget-mb's)."""
    from edgecore.device import DeviceSpec, prepare
    from edgecore.profiles import resolve_profile

    profile = resolve_profile(args.device)
    if args.budget_mb is not None:
        profile = replace(profile, memory_budget_mb=args.budget_mb)
    return prepare(DeviceSpec(args.model, profile, lora, batch_size=settings.batch_size, seq_len=settings.seq_len,
                              exits=args.exits, data=args.data, seed=args.seed, precision=settings.precision))


def _adaptive_settings(args):
    from edgecore.tuning.adaptive import AdaptiveSettings

    if not args.adaptive:
        if args.device or args.budget_mb is not None or args.window is not None:
            raise EdgecoreError("--device, --budget-mb and --window apply to adaptive tuning: add --adaptive")
        return None
    if args.device and args.window is not None:
        raise EdgecoreError("--window with --device: the device picks the deepest window its budget fits; "
                            "leave --device out to fix the window (with --budget-mb to check it)")
    budget = args.budget_mb
    if budget is not None and budget <= 0:
        raise EdgecoreError(f"--budget-mb {budget} must be positive")
    if args.exit_rank < 1:
        raise EdgecoreError(f"--exit-rank {args.exit_rank} must be at least 1")
    return AdaptiveSettings(exits=args.exits, exit_rank=args.exit_rank, window=args.window, budget_mb=budget)


def _finetune_adaptive(args, model, encoder, dataset, train_samples, held_out, settings, adaptive_settings, lora,
                       evals, out, record, started, dev=None) -> None:
    from edgecore.allocator import limit_heap_fragmentation
    from edgecore.tuning import adaptive
    from edgecore.tuning.voting import exit_scores, predict_early

    limit_heap_fragmentation()  # freed activations go back to the OS: the estimate assumes it
    exits, depth = (dev.exits, dev.depth) if dev else adaptive.prepare(model, adaptive_settings, settings, lora)
    budget = f"budget {depth.budget_mb:.0f} MB" if depth.budget_mb is not None else "no budget"
    print(f"adaptive: exits after layers {list(exits.layers)}, window {depth.layers} layers "
          f"(estimated {depth.estimate_mb:.0f} MB, {budget})")
    validation = dataset.validation[: args.eval_samples or len(dataset.validation)]
    result = adaptive.tune(model, exits, depth, encoder, train_samples, validation, settings, adaptive_settings,
                           progress=not args.quiet, on_step=record)
    report = result.report
    print(f"trained {len(report.steps)} steps in {report.train_s:.1f} s: {report.mean_step_s:.2f} s/step, "
          f"loss {report.steps[0].loss:.3f} -> {report.final_loss:.3f}, peak RSS {report.peak_rss_mb:.0f} MB")
    print("votes by exit: " + ", ".join(f"{e}: {v:.2f}" for e, v in zip(exits.layers, result.votes)))
    adaptive.save(out / "adapter", model, exits, {"depth": depth.layers, "votes": result.votes})
    evals["after_by_exit"] = {str(e): s for e, s in exit_scores(model, exits, encoder, held_out).items()}
    for e, scores in evals["after_by_exit"].items():
        print(f"after, exit {e}: " + _metrics_line({**scores, "perplexity": math.exp(min(scores["loss"], 50)), "n": len(held_out)}))
    if encoder.choice_token_ids:
        evals["early_exit"] = predict_early(model, exits, encoder, held_out, result.votes, args.threshold)
        early = evals["early_exit"]
        print(f"early exit (threshold {args.threshold}): accuracy {early['accuracy']:.1%}, "
              f"{early['mean_layers']:.1f} layers on average, {early['latency_ms']:.0f} ms/sample")
    summary = {
        "model": args.model, "data": args.data, "eval_split": args.eval_split, "adaptive": result.summary(),
        "settings": {"lora": asdict(lora), "train": asdict(settings), "adaptive": asdict(adaptive_settings)},
        "train": report.summary(), "eval": evals, "adapter": str(out / "adapter"),
        "wall_s": time.perf_counter() - started,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    with (out / "windows.jsonl").open("w") as f:
        f.writelines(json.dumps(h) + "\n" for h in result.history)
    print(f"run folder: {out} (adapter/ with exit adapters, steps.jsonl, windows.jsonl, summary.json)")


def _metrics_line(metrics: dict) -> str:
    parts = [f"accuracy {metrics['accuracy']:.1%}"] if "accuracy" in metrics else []
    parts += [f"loss {metrics['loss']:.3f}", f"perplexity {metrics['perplexity']:.2f}", f"n={metrics['n']}"]
    return ", ".join(parts)


def _compress_parser(sub) -> None:
    p = sub.add_parser(
        "compress",
        help="LUC: per-layer sparsity and bit-width for a device's memory budget",
        description="Measure each decoder layer's sensitivity to every compression the device "
        "profile allows (KL to the dense model on calibration samples of your data; cached), "
        "choose per-layer sparsity and bits that minimise total sensitivity within the weight "
        "budget (multiple-choice knapsack), compress (Wanda pruning, packed group-wise "
        "quantization) and save the model folder, which reloads without recompressing.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m, tiny-micro, tiny-5m, or a local Hugging Face model folder")
    p.add_argument("--device", required=True, help="device profile: a shipped name (e.g. pi-zero-2w), a TOML file, or 'local'")
    p.add_argument("--data", default="bbc", help="calibration data: bbc, shakespeare, shakespeare:role, or a JSONL file / folder")
    p.add_argument("--weight-budget-mb", type=float, default=None, help="budget for the stored weights in MiB (default: the profile's budget minus the tuning step's state)")
    p.add_argument("--batch", type=int, default=4, help="tuning batch the budget leaves room for")
    p.add_argument("--seq-len", type=int, default=128, help="tuning sequence length the budget leaves room for")
    p.add_argument("--tuning-window", type=int, default=1, help="layers trained per step that the budget leaves room for")
    p.add_argument("--calib-samples", type=int, default=8, help="calibration sequences from the training split")
    p.add_argument("--calib-len", type=int, default=128, help="tokens per calibration sequence")
    p.add_argument("--group-size", type=int, default=64, help="quantization group size")
    p.add_argument("--seed", type=int, default=0, help="seed for the data split and the calibration draw")
    p.add_argument("--out", type=Path, default=None, help="folder for the compressed model (default runs/compressed/MODEL-DEVICE)")
    p.add_argument("--json", type=Path, default=None, help="also write the table, totals and policy to this JSON file")
    p.add_argument("--no-cache", action="store_true", help="measure sensitivity again even if a cached table exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=_compress)


def _compress(args) -> None:
    from edgecore.device import planning_profile
    from edgecore import luc
    from edgecore.luc import pipeline
    from edgecore import models
    from edgecore.memory import MIB
    from edgecore.profiles import resolve_profile

    # Every input is checked before the slow work starts.
    profile = resolve_profile(args.device)
    shape = models.shape(args.model)
    plan = luc.tuning_reserve_step(shape, args.batch, args.seq_len, args.tuning_window)
    budget = None if args.weight_budget_mb is None else int(args.weight_budget_mb * MIB)
    if budget is not None and budget <= 0:
        raise EdgecoreError(f"--weight-budget-mb {args.weight_budget_mb} must be positive")
    out = args.out or pipeline.default_out(args.model, profile)
    if luc.is_compressed_folder(out):
        raise EdgecoreError(f"--out {out} already holds a compressed model; choose another folder or remove it")
    if args.json and args.json.is_dir():
        raise EdgecoreError(f"--json {args.json} is a directory; give a file name")

    # The default budget is what the device plans with (edgecore.device's planning share of its budget),
    # so the folder passes the device's check when it brings it (`python -m client --model FOLDER`).
    result = pipeline.compress(
        args.model, planning_profile(profile), args.data, weight_budget=budget, plan=plan, calib_samples=args.calib_samples,
        calib_len=args.calib_len, group_size=args.group_size, seed=args.seed,
        cache=None if args.no_cache else pipeline.default_cache(), progress=not args.quiet,
    )
    policy = result.policy
    rows = policy.table(shape)
    memory = luc.summarize_memory(policy, result.model)
    dense_mb = luc.dense_nbytes(shape, args.group_size) / MIB
    print(f"{'layer':>10}  {'sensitivity':>11}  {'sparsity':>8}  {'bits':>4}  {'MB':>7}")
    for row in rows:
        sparsity = row["sparsity"] if isinstance(row["sparsity"], str) else f"{row['sparsity']:.0%}"
        print(f"{row['layer']:>10}  {row['sensitivity']:>11.3e}  {sparsity:>8}  {row['bits']:>4}  {row['mb']:>7.2f}")
    budget_mb = (policy.budget_bytes or 0) / MIB
    print(f"weights {memory['promised_mb']:.1f} MB promised, {memory['measured_mb']:.1f} MB measured "
          f"(dense {dense_mb:.1f} MB, {dense_mb / memory['measured_mb']:.1f}x smaller); budget {budget_mb:.1f} MB; "
          f"total sensitivity {policy.total_sensitivity:.4f} nats/token")
    cached = " (from cache)" if result.from_cache else ""
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result.seconds.items()) + cached)
    luc.save_compressed(out, result.model, result.tokenizer, policy)
    print(f"compressed model: {out} (reload with edgecore.luc.load_compressed)")
    if args.json:
        report = {
            "model": args.model, "device": profile.summary(), "data": args.data, "out": str(out),
            "layers": rows, "memory": {**memory, "dense_mb": dense_mb, "budget_mb": budget_mb},
            "total_sensitivity": policy.total_sensitivity, "seconds": result.seconds,
            "sensitivity_from_cache": result.from_cache, "policy": policy.to_dict(),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"json: {args.json}")


def _schedule_parser(sub) -> None:
    p = sub.add_parser(
        "schedule",
        help="scheduled execution: per-layer kernels for a compressed model on a device, and what they cost",
        description="Plan how a LUC-compressed model runs on a device: for every layer, the kernel "
        "(LUC's rebuild-per-call, an unpacked weight kept, torch's int8 / int4 weight-only matmul, CSR "
        "sparse) that the measured cost table says is fastest for the workload, within the device's "
        "memory budget; layers stream from disk when even the compressed weights do not fit. Prints "
        "the plan with predicted time and memory per layer. Kernel timings are measured on this "
        "machine once and cached per device profile.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="smollm2-135m", help="a compressed model folder (python -m edgecore compress), or a model name to compress for the device first")
    p.add_argument("--device", required=True, help="device profile: a shipped name (e.g. pi-zero-2w), a TOML file, or 'local'")
    p.add_argument("--workload", choices=("train", "forward", "decode"), default="train", help="a window training step, a batched forward, or greedy decoding at batch 1")
    p.add_argument("--batch", type=int, default=4, help="train / forward: sequences per batch")
    p.add_argument("--seq-len", type=int, default=128, help="train / forward: tokens per sequence; decode: prompt tokens")
    p.add_argument("--window", type=int, default=None, help="train: layers in the window (default: the deepest that fits the budget)")
    p.add_argument("--new-tokens", type=int, default=64, help="decode: tokens generated")
    p.add_argument("--budget-mb", type=float, default=None, help="memory budget in MiB (default: the profile's)")
    p.add_argument("--data", default="bbc", help="calibration data when the model is compressed here")
    p.add_argument("--luc-grid", choices=("quick", "full"), default="quick", help="LUC candidates when the model is compressed here")
    p.add_argument("--costs", type=Path, default=None, help="a cost table JSON (e.g. measured on the device itself); default: this machine's cache for the profile")
    p.add_argument("--json", type=Path, default=None, help="also write the plan to this JSON file")
    p.set_defaults(handler=_schedule)


def _schedule(args) -> None:
    from edgecore.schedule import cli as schedule_cli

    schedule_cli.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m edgecore", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _finetune_parser(sub)
    _compress_parser(sub)
    _schedule_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        args.handler(args)
    except EdgecoreError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0

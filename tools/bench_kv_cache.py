"""KV-cache passes against the float cache at long contexts: accuracy, agreement, KV memory, decode speed.

    python tools/bench_kv_cache.py --contexts 1024,2048 --n 200 --rounds 20 -o docs/kv_cache

For each max_context, exports the built-in model once per configuration (`--configs`: the float cache,
`kv8`, `flashcache`, both, `attentionpack` at two ranks; ONNX + ExecuTorch, verified) and, per runtime in one spawned process with the
thread count fixed, runs the bundles side by side on multi-turn prompts: the ShapesVQA test question asked
last, after earlier turns about the same image (questions with their true answers, as the model was
trained) that fill the prompt to the context's length less `--room`. The conversation up to the last
turn is prefilled with the image; the last turn (the question) goes through decode steps, as an app
continues a chat, so it reads the cache the KV passes left (a prefill alone would not: it attends to every
row). Per configuration: first-token
accuracy (Wilson 95% interval), agreement with the float cache and the mean KL divergence of the
first-token distribution from it, the allocated KV bytes (the manifest's), and decode tokens/s at that fill
(decode steps of all bundles alternated in shuffled rounds, so drift on a shared machine hits them alike;
the ratio to the float cache is what to read). Prints a table and writes kv_cache.json and table.md.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlmc import api  # noqa: E402
from vlmc.eval.evaluate import normalize_answer, wilson  # noqa: E402

MODEL = "shapes-llava"


def multi_turn_prompts(tok, prompt_info: dict, n: int, length: int) -> list[tuple]:
    """(image uint8 [3,H,W], the conversation so far as PromptIds, the last turn's ids, answer) per test item:
    earlier turns about the same scene (with their answers and </s>), repeated until the conversation and
    the last turn hold about `length` tokens; the last turn asks the item's question."""
    from vlmc.eval import shapes_vqa
    from vlmc.models_zoo.tokenizer import PromptIds

    p, eos = prompt_info, p_eos(prompt_info)
    out = []
    for i, item in enumerate(shapes_vqa.items("test", n)):
        rng = np.random.default_rng([11, i])
        turns = [(q, a) for q, a, _ in shapes_vqa.scene_questions(item.objects, rng, 16) if q != item.question]
        if not turns:
            turns = [(item.question, item.answer)]
        first = tok.prompt(p["template"], turns[0][0], p["num_image_tokens"], p["image_token_id"], p["bos_token_id"])
        after, k = list(first.after) + tok.encode(turns[0][1]) + [eos], 1
        final = tok.encode(f"USER: {item.question} ASSISTANT:")
        while True:
            q, a = turns[k % len(turns)]
            turn = tok.encode(f"USER: {q} ASSISTANT:") + tok.encode(a) + [eos]
            if len(first.before) + p["num_image_tokens"] + len(after) + len(turn) + len(final) > length:
                break
            after += turn
            k += 1
        ids = PromptIds(list(first.before), after, p["num_image_tokens"], p["image_token_id"])
        out.append((item.image.transpose(2, 0, 1).copy(), ids, final, item.answer))
    return out


def p_eos(prompt_info: dict) -> int:
    return int(prompt_info["eos_token_ids"][0])


def ask(session, ids, image, final) -> np.ndarray:
    """The conversation so far prefilled with the image, then the last turn's tokens through decode steps,
    as an app continues a chat: they read the cache as the KV passes left it. The answer's logits [V]."""
    from vlmc.runtimes.generate import encode_image, prompt_embeds

    session.prefill(prompt_embeds(session, ids, encode_image(session, image)), image_start=len(ids.before))
    pos = len(ids)
    for token in final:
        logits = session.step(session.embed([token]), pos)
        pos += 1
    return logits


def _measure(bundles: dict, runtime: str, n: int, room: int, rounds: int, steps: int, threads: int) -> dict:
    """In a spawned process: each bundle's first-token distributions on the prompts, then decode timing."""
    import torch

    torch.set_num_threads(threads)
    from vlmc.bundle import Bundle
    from vlmc.models_zoo.tokenizer import TextTokenizer
    from vlmc.runtimes import open_session

    labels = list(bundles)
    sessions = {label: open_session(Bundle(path), runtime) for label, path in bundles.items()}
    first = Bundle(bundles[labels[0]])
    info, tok = first.manifest["prompt"], TextTokenizer(first.path)
    prompts = multi_turn_prompts(tok, info, n, first.manifest["decoder"]["max_context"] - room)
    out = {label: {"answers": [], "logits": []} for label in labels}
    for image, ids, final, answer in prompts:
        for label, s in sessions.items():
            logits = ask(s, ids, image, final)
            out[label]["answers"].append(normalize_answer(tok.decode([int(np.argmax(logits))])) == normalize_answer(answer))
            out[label]["logits"].append(logits.astype(np.float64))
    image, ids, final, _ = prompts[0]  # decode timing after the first long conversation
    start = {}
    for label, s in sessions.items():
        ask(s, ids, image, final)
        start[label] = len(ids) + len(final)
    token = s.embed([int(tok.encode("red")[0])])
    times = {label: [] for label in labels}
    rng = np.random.default_rng(0)
    for _ in range(rounds):
        for j in rng.permutation(len(labels)):
            label = labels[j]
            s = sessions[label]
            t0 = time.perf_counter()
            for step in range(steps):
                s.step(token, start[label] + step)
            times[label].append((time.perf_counter() - t0) * 1000.0 / steps)
    out["prompt_tokens"] = [len(p[1]) + len(p[2]) for p in prompts]
    for label in labels:
        out[label]["decode_ms"] = times[label]
    return out


def _child(args, q) -> None:
    try:
        q.put(_measure(*args))
    except BaseException as e:  # report to the parent instead of hanging it
        q.put({"error": f"{type(e).__name__}: {e}"})


def measure_in_spawned_process(*args) -> dict:
    """ExecuTorch hangs in a fork()ed child, so every measurement runs in a spawned one."""
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(args, q))
    p.start()
    result = q.get()
    p.join()
    if "error" in result:
        raise SystemExit(f"measurement failed: {result['error']}")
    return result


def configs(text: str) -> list[tuple[str, list[dict]]]:
    """LABEL=name:key=value+name... -> (label, recipe passes) pairs."""
    from vlmc.passes.registry import parse_cli

    out = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        label, _, spec = item.partition("=")
        out.append((label, [parse_cli(p) for p in spec.split("+") if p]))
    return out


def kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    def log_softmax(x):
        z = x - x.max()
        return z - np.log(np.exp(z).sum())

    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return float(np.sum(np.exp(lp) * (lp - lq)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", default="1024,2048", help="max_context values, comma-separated")
    ap.add_argument("--configs", default="float32=;int8=kv8;flashcache@49=flashcache:keep=49;flashcache@49+int8=flashcache:keep=49+kv8;"
                                         "attentionpack@49=attentionpack:keep=49;attentionpack@49 r32=attentionpack:keep=49,rank=32,light_rank=8",
                    help="LABEL=PASS[+PASS...] separated by ';' (the first is the reference: keep it the float cache)")
    ap.add_argument("--runtimes", default="onnxruntime,executorch")
    ap.add_argument("--n", type=int, default=100, help="test questions per configuration")
    ap.add_argument("--room", type=int, default=48, help="slots left free after the prompt (for decode steps)")
    ap.add_argument("--rounds", type=int, default=20, help="timed rounds of decode steps")
    ap.add_argument("--steps", type=int, default=8, help="decode steps per timed round")
    ap.add_argument("--threads", type=int, default=2, help="torch / runtime threads")
    ap.add_argument("-o", "--out", type=Path, default=Path("kv_cache"))
    ap.add_argument("--work", type=Path, default=Path("build/kv_cache"), help="the bundles (reused when there)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for context in (int(c) for c in args.contexts.split(",")):
        bundles, manifests = {}, {}
        for label, passes in configs(args.configs):
            path = args.work / f"c{context}-{label.replace('@', '').replace('+', '-')}"
            if not (path / "manifest.json").is_file():
                print(f"export: max_context {context}, {label}", flush=True)
                api.compile({"model": MODEL, "targets": ["onnx", "executorch"], "max_context": context,
                             "max_prompt": context - 8, "passes": passes}, path)
            bundles[label] = str(path)
            manifests[label] = json.loads((path / "manifest.json").read_text())
        for runtime in args.runtimes.split(","):
            print(f"measure: max_context {context} on {runtime}", flush=True)
            r = measure_in_spawned_process(bundles, runtime, args.n, args.room, args.rounds, args.steps, args.threads)
            reference = next(iter(bundles))
            base_ms = float(np.median(r[reference]["decode_ms"]))
            for label in bundles:
                answers, logits = r[label]["answers"], r[label]["logits"]
                ms = float(np.median(r[label]["decode_ms"]))
                rows.append({
                    "max_context": context, "runtime": runtime, "config": label, "n": len(answers),
                    "prompt_tokens": int(np.mean(r["prompt_tokens"])),
                    "accuracy": round(100 * sum(answers) / len(answers), 1), "ci95": wilson(sum(answers), len(answers)),
                    "agreement": round(100 * np.mean([np.argmax(a) == np.argmax(b) for a, b in zip(logits, r[reference]["logits"])]), 1),
                    "mean_kl": float(np.mean([kl(b, a) for a, b in zip(logits, r[reference]["logits"])])),
                    "kv_bytes": manifests[label]["decoder"]["kv_cache"]["bytes"],
                    "kv_ratio": round(manifests[label]["decoder"]["kv_cache"]["bytes"] / manifests[reference]["decoder"]["kv_cache"]["bytes"], 4),
                    "decode_ms": round(ms, 3), "decode_tokens_per_s": round(1000.0 / ms, 1), "decode_speed_vs_float": round(base_ms / ms, 3),
                })
    (args.out / "kv_cache.json").write_text(json.dumps({"model": MODEL, "args": {k: str(v) for k, v in vars(args).items()},
                                                        "rows": rows}, indent=1))
    head = "| max_context | runtime | configuration | prompt tokens | accuracy % (95% CI) | agreement % | mean KL | KV MB (x float) | decode tok/s (x float) |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lo, hi = r["ci95"]
        lines.append(f"| {r['max_context']} | {r['runtime']} | {r['config']} | {r['prompt_tokens']} | {r['accuracy']} "
                     f"({lo:.1f}..{hi:.1f}) | {r['agreement']} | {r['mean_kl']:.2e} | {r['kv_bytes'] / 1e6:.2f} ({r['kv_ratio']}) | "
                     f"{r['decode_tokens_per_s']} ({r['decode_speed_vs_float']}) |")
    table = "\n".join(lines)
    (args.out / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()

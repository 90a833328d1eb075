"""Students on other transformers versions, each in a throwaway virtual environment without hf_matta:
`python -m tests.conformance.old_transformers DEST VERSION [VERSION ...]`.

A tiny nested model is built and extracted here (uniform student: a stock GPT-2; mixed student and nested model:
MatGPT2 with its modeling files), then for each transformers version `DEST/venv-VERSION` gets `torch==2.13.0` first
(a bare torch requirement would pull a multi-GB CUDA build) and then that transformers, and a script there loads each
folder with `AutoTokenizer` and `AutoModelForCausalLM` (`trust_remote_code=True` for MatGPT2 only), checks its logits
against this environment's and generates greedily. It prints one line per version and folder: `ok` with the seconds
taken, or the error, and exits 1 unless every uniform student loaded (MatGPT2 below its floor fails by design, with
the message its configuration file raises).
"""

import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

from hf_matta.extract import extract_student, save_student
from hf_matta.models import MatGPT2Config, MatGPT2LMHeadModel

from ..conftest import tiny_kwargs
from ..test_extract import char_tokenizer


TORCH = "torch==2.13.0"
PROMPT = "Hello"
CHECK = textwrap.dedent(
    """
    import json, sys, time, torch, transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    results = {}
    for folder, case in json.loads(sys.argv[1]).items():
        start = time.perf_counter()
        try:
            # A stock tokenizer: no code of the folder runs (AutoTokenizer reads the model config, which for MatGPT2
            # would ask whether to run its code: the answer is no).
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
            model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=case["remote"]).eval()
            input_ids = tokenizer(case["prompt"], return_tensors="pt").input_ids
            assert input_ids.tolist() == case["input_ids"], f"tokenized {input_ids.tolist()}"
            logits = model(input_ids).logits
            error = (logits - torch.tensor(case["logits"])).abs().max().item()
            assert error < 1e-4, f"logits differ by {error}"
            generated = model.generate(input_ids, max_new_tokens=8, do_sample=False)
            assert generated.tolist() == case["generated"], f"generated {generated.tolist()}"
            results[folder] = f"ok ({type(model).__name__}, {time.perf_counter() - start:.1f} s)"
        except Exception as exc:
            results[folder] = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    print()  # after any prompt a library left without a newline
    print("REPORT", json.dumps({"transformers": transformers.__version__, "results": results}))
    """
)


def build_folders(root: Path) -> dict[str, dict]:
    """The three kinds of folder users load, written by this hf_matta, with the logits and greedy tokens expected."""
    torch.manual_seed(0)
    nested = MatGPT2LMHeadModel(MatGPT2Config(**tiny_kwargs(), mat_widths=[16, 64])).eval()
    tokenizer = char_tokenizer()
    folders = {
        "uniform student": (save_student(extract_student(nested, 16), root / "uniform", tokenizer), False),
        "mixed student": (save_student(extract_student(nested, [16, 64]), root / "mixed", tokenizer), True),
        "nested model": (save_student(nested, root / "nested", tokenizer), True),
    }
    cases = {}
    for name, (folder, remote) in folders.items():
        model = MatGPT2LMHeadModel.from_pretrained(folder) if remote else extract_student(nested, 16)
        input_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
        generated = model.generate(input_ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        cases[str(folder)] = {
            "name": name,
            "remote": remote,
            "prompt": PROMPT,
            "input_ids": input_ids.tolist(),
            "logits": model(input_ids).logits.tolist(),
            "generated": generated.tolist(),
        }
    return cases


def environment(dest: Path, version: str) -> Path:
    """`dest/venv-VERSION` with torch and exactly that transformers (made once, reused); its python."""
    venv = dest / f"venv-{version}"
    python = venv / "bin" / "python"
    if not (venv / ".installed").is_file():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        for requirement in (TORCH, f"transformers=={version}"):
            subprocess.run([str(python), "-m", "pip", "install", "--quiet", requirement], check=True)
        (venv / ".installed").touch()
    return python


def main(dest: Path, versions: list[str]) -> int:
    dest = dest.resolve()  # the checks run from a temporary folder
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as root:
        cases = build_folders(Path(root))
        uniform_ok = True
        for version in versions:
            start = time.perf_counter()
            python = environment(dest, version)
            setup = time.perf_counter() - start
            run = subprocess.run(
                [str(python), "-c", CHECK, json.dumps(cases)], capture_output=True, text=True, cwd=root, check=False
            )
            if run.returncode != 0:
                print(f"transformers {version}: the check did not run:\n{run.stderr[-2000:]}")
                uniform_ok = False
                continue
            report = json.loads(next(line for line in run.stdout.splitlines() if line.startswith("REPORT "))[7:])
            print(f"transformers {report['transformers']} (environment {setup:.0f} s):")
            for folder, outcome in report["results"].items():
                print(f"  {cases[folder]['name']:16} {outcome}")
                uniform_ok &= cases[folder]["remote"] or outcome.startswith("ok")
    return 0 if uniform_ok else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2:]))

"""The `tritllm` command end to end: each subcommand runs as `python -m tritllm_ext ...` in a
subprocess, on tiny models (hidden 64, 2 layers, a 258-token byte tokenizer) built by the test."""
import io
import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tritllm_ext.cli import TextPrinter  # noqa: E402
from tritllm_ext.demo import byte_level_tokenizer, llama_config, save_random_llama  # noqa: E402
from tritllm_ext.model import dequantize_model, quantize_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512)
PROMPT = "Trits: "


def run_cli(*args, timeout=300):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-m", "tritllm_ext", *map(str, args)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def tiny_config():
    tokenizer = byte_level_tokenizer()
    return llama_config(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, **TINY)


@pytest.fixture(scope="module")
def fp16_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp16")
    save_random_llama(str(path), tiny_config(), dtype=torch.float16, seed=3, std=0.3)
    return path


@pytest.fixture(scope="module")
def packed_dir(fp16_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("packed") / "model"
    result = run_cli("quantize", fp16_dir, path, "--depth", "2", "--quiet")
    assert result.returncode == 0, result.stderr
    return path, result


@pytest.fixture(scope="module")
def entrit_dir(tmp_path_factory):
    """An Entrit-style model: quantized, then published as dequantized FP16."""
    path = tmp_path_factory.mktemp("entrit")
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(), dtype=torch.float32)
    quantize_model(model, depth=2, progress=False)
    dequantize_model(model, torch.float16).save_pretrained(str(path))
    byte_level_tokenizer().save_pretrained(str(path))
    return path


def test_help_lists_every_command():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("quantize", "adopt", "info", "generate", "demo", "bench"):
        assert command in result.stdout


def test_unknown_subcommand_is_a_usage_error():
    result = run_cli("squash", "x")
    assert result.returncode == 2
    assert "invalid choice: 'squash'" in result.stderr


def test_quantize_writes_a_packed_checkpoint_and_reports_bits_per_weight(packed_dir):
    path, result = packed_dir
    assert os.path.exists(path / "config.json")
    assert any(name.endswith(".safetensors") for name in os.listdir(path))
    assert os.path.exists(path / "tokenizer.json")
    assert "bits/weight" in result.stdout


def test_info_describes_the_checkpoint(packed_dir):
    path, _ = packed_dir
    result = run_cli("info", path)
    assert result.returncode == 0, result.stderr
    for word in ("format version", "depth", "bits/weight", "FP16"):
        assert word in result.stdout
    raw = run_cli("info", path, "--json")
    assert raw.returncode == 0, raw.stderr
    assert isinstance(json.loads(raw.stdout), dict)


def test_generate_streams_the_greedy_continuation(packed_dir):
    import tritllm_ext  # noqa: F401  (from_pretrained reads packed checkpoints)

    path, _ = packed_dir
    result = run_cli("generate", path, "--prompt", PROMPT, "--max-new-tokens", 6,
                     "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "tokens/s" in result.stdout
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                         do_sample=False)
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert result.stdout.startswith(PROMPT + text)


def test_generate_falls_back_to_transformers_for_other_architectures(tmp_path):
    tokenizer = byte_level_tokenizer()
    config = transformers.GemmaConfig(vocab_size=len(tokenizer), head_dim=16, **TINY)
    save_random_llama(str(tmp_path / "fp16"), config, dtype=torch.float16, seed=3)
    assert run_cli("quantize", tmp_path / "fp16", tmp_path / "packed", "--quiet").returncode == 0
    result = run_cli("generate", tmp_path / "packed", "--prompt", PROMPT, "--max-new-tokens", 4,
                     "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "model_type 'gemma' is not one of" in result.stderr
    assert "tokens/s with transformers' generate" in result.stdout


def test_generate_with_sampling_runs(packed_dir):
    path, _ = packed_dir
    result = run_cli("generate", path, "--prompt", PROMPT, "--max-new-tokens", 4, "--sample",
                     "--temperature", "0.9", "--top-k", "5", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "tokens/s" in result.stdout


def test_adopt_packs_a_conforming_model_exactly(entrit_dir, tmp_path):
    result = run_cli("adopt", entrit_dir, tmp_path / "adopted", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "exact" in result.stdout
    assert run_cli("info", tmp_path / "adopted").returncode == 0


def test_adopt_refuses_a_non_conforming_model(fp16_dir, tmp_path):
    result = run_cli("adopt", fp16_dir, tmp_path / "adopted", "--quiet")
    assert result.returncode == 1
    assert "tritllm adopt: error:" in result.stderr
    assert "--requantize" in result.stderr
    assert "Traceback" not in result.stderr


def test_adopt_requantize_accepts_a_non_conforming_model(fp16_dir, tmp_path):
    result = run_cli("adopt", fp16_dir, tmp_path / "adopted", "--requantize", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "requantized" in result.stdout


def test_a_pickle_only_checkpoint_is_refused(tmp_path):
    model = transformers.AutoModelForCausalLM.from_config(tiny_config())
    model.config.save_pretrained(str(tmp_path))
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    result = run_cli("quantize", tmp_path, tmp_path / "out", "--quiet")
    assert result.returncode == 1
    assert "tritllm quantize: error:" in result.stderr
    assert "safetensors" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [
    ("quantize", "{missing}", "{tmp}/out"),
    ("adopt", "{missing}", "{tmp}/out"),
    ("info", "{missing}"),
    ("generate", "{missing}", "--prompt", "x"),
])
def test_a_missing_directory_is_named(args, tmp_path):
    missing = tmp_path / "no_such_model"
    result = run_cli(*(a.format(missing=missing, tmp=tmp_path) for a in args))
    assert result.returncode == 1
    assert f"'{missing}' does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_quantize_refuses_to_write_over_its_source(fp16_dir):
    result = run_cli("quantize", fp16_dir, fp16_dir)
    assert result.returncode == 1
    assert "OUT_DIR must differ from SRC_DIR" in result.stderr


def test_info_of_a_directory_without_a_checkpoint(tmp_path):
    result = run_cli("info", tmp_path)
    assert result.returncode == 1
    assert "tritllm info: error:" in result.stderr
    assert "Traceback" not in result.stderr


def test_generate_needs_a_tokenizer(packed_dir, tmp_path):
    path, _ = packed_dir
    for name in os.listdir(path):
        if not name.startswith("tokenizer"):
            os.link(path / name, tmp_path / name)
    result = run_cli("generate", tmp_path, "--prompt", "x", "--device", "cpu")
    assert result.returncode == 1
    assert "has no tokenizer" in result.stderr


def test_generate_refuses_bad_token_counts(packed_dir):
    path, _ = packed_dir
    result = run_cli("generate", path, "--prompt", "x", "--max-new-tokens", 0)
    assert result.returncode == 1
    assert "--max-new-tokens must be >= 1" in result.stderr


def test_demo_runs_the_whole_pipeline(tmp_path):
    result = run_cli("demo", "--device", "cpu", "--max-new-tokens", 4, "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    for word in ("bits/weight", "FP16", "logit difference", "tokens/s"):
        assert word in result.stdout
    assert os.path.exists(tmp_path / "packed" / "config.json")


def test_bench_runs_the_e2e_benchmark(tmp_path):
    result = run_cli("bench", "e2e", "--device", "cpu", "--model", "tiny", "--quick",
                     "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "e2e_cpu_quick.json").read_text())
    names = [v["name"] for v in data["variants"]]
    assert names == ["float32", "bfloat16", "trit d=2 (float32)", "trit d=2 (bfloat16)"]
    assert all(v["decode"]["1"]["tokens_per_s"] > 0 for v in data["variants"])
    assert "| variant |" in result.stdout
    again = run_cli("bench", "e2e", "--from-json", tmp_path / "e2e_cpu_quick.json")
    assert again.returncode == 0, again.stderr
    assert "| trit d=2 (float32) |" in again.stdout


def test_bench_of_an_unknown_benchmark_is_a_usage_error():
    result = run_cli("bench", "nope")
    assert result.returncode == 2
    assert "invalid choice: 'nope'" in result.stderr


def test_text_printer_holds_back_an_incomplete_character():
    tokenizer = byte_level_tokenizer()
    out = io.StringIO()
    printer = TextPrinter(tokenizer, out)
    ids = tokenizer("aé€", add_special_tokens=False)["input_ids"]  # 1 + 2 + 3 bytes
    seen = []
    for token in ids:
        printer.add(token)
        seen.append(out.getvalue())
    printer.finish()
    assert seen == ["a", "a", "aé", "aé", "aé", "aé€"]
    assert out.getvalue() == "aé€\n"

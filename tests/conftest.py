import os

import torch

# Without a GPU, Triton kernels run in Triton's CPU interpreter. Triton reads this once, when it is first
# imported (transformers imports it), so it is set before anything else.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# actsparse first: it imports transformers (which imports torchao) with torchao's import-time warnings quieted
import actsparse  # noqa: E402, F401

# isort: split
import pytest  # noqa: E402
from helpers import VOCAB, byte_tokenizer, make_tiny_llama  # noqa: E402
from hypothesis import settings  # noqa: E402

# One intra-op thread: the tiny models gain nothing from two, and on a busy machine OpenMP's spin-waiting
# threads make every op wait for a core (measured on 2 cores with two other busy processes:
# tests/test_calibrate.py + test_methods.py 137 s with 2 threads, 28 s with 1; idle 17 s either way; the
# whole suite idle 3:50 with 1 thread vs 3:39 with 2). ACTSPARSE_TEST_THREADS overrides it.
torch.set_num_threads(int(os.environ.get("ACTSPARSE_TEST_THREADS", "1")))

# Every property test replays the same examples on every run (CI, the GPU machine, a laptop): a failure found
# once is found again. HYPOTHESIS_PROFILE=explore draws new examples (a local bug hunt).
settings.register_profile("replay", derandomize=True, deadline=None)
settings.register_profile("explore", derandomize=False, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "replay"))


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def calib_data():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (2, 24), generator=g) for _ in range(4)]


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A saved tiny random Llama with a byte-level tokenizer, loadable by name/path."""
    d = tmp_path / "tiny-llama"
    make_tiny_llama().save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return str(d)


@pytest.fixture
def text_file(tmp_path):
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "the",
        "lazy",
        "dog",
        "while",
        "seven",
        "wizards",
        "quietly",
        "judge",
        "boxing",
        "matches",
        "and",
        "pack",
        "my",
        "box",
        "with",
        "five",
        "dozen",
        "liquor",
        "jugs",
    ]
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(words[i] for i in torch.randint(0, len(words), (40,), generator=g).tolist()) for _ in range(30)]
    p = tmp_path / "corpus.txt"
    p.write_text("\n".join(lines), encoding="utf-8")
    return str(p)


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M (fp32) and its tokenizer, loaded once."""
    from actsparse.models import load_model

    return load_model(None)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and a private datasets cache."""
    pytest.importorskip("lm_eval")
    import datasets.config

    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache", raising=False)
    monkeypatch.chdir(tmp_path)  # lm-eval asks `git describe` for the working folder's commit

"""``loratools info`` of a PEFT adapter answers without torch, and says exactly what the full
reader (held to PEFT by test_merge_peft) says: every field of every module, for every fixture."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from loratools.options import Options
from loratools.pipeline import prepare_adapter
from loratools.summary import summarize_adapter, summarize_fast

from .conftest import ADAPTERS, FIXTURES


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_fast_summary_equals_the_full_reader(adapters, name: str) -> None:
    path = adapters[name]
    fast = summarize_fast(path, shown_as=str(path))
    assert fast is not None, f"{name}: the fast path declined a plain PEFT safetensors adapter"
    full = summarize_adapter(prepare_adapter(path, Options(), open_orientation=True), shown_as=str(path), base=None,
                             unbound={})
    fast_rows, full_rows = fast.pop("module_list"), full.pop("module_list")
    assert fast == full
    assert [r["target"] for r in fast_rows] == [r["target"] for r in full_rows]
    for a, b in zip(fast_rows, full_rows):
        assert a.pop("delta_norm") == pytest.approx(b.pop("delta_norm"), rel=1e-12)
        assert a == b


def test_fast_summary_declines_what_it_does_not_know(adapters, tmp_path: Path) -> None:
    """A non-finite factor: the fast path steps aside and the full reader gives its error."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "nan"
    shutil.copytree(adapters["all-linear"], folder)
    sd = load_file(folder / "adapter_model.safetensors")
    key = next(iter(sd))
    sd[key][0, 0] = float("nan")
    save_file(sd, folder / "adapter_model.safetensors")
    assert summarize_fast(folder, shown_as="x") is None
    from click.testing import CliRunner

    from loratools.cli import cli

    result = CliRunner().invoke(cli, ["info", str(folder)])
    assert result.exit_code == 1 and "NaN" in result.output
    assert summarize_fast(FIXTURES / "tiny-llama", shown_as="x") is None  # a model, not an adapter


def test_info_of_a_peft_adapter_does_not_import_torch() -> None:
    code = ("import sys, json; from click.testing import CliRunner; from loratools.cli import cli; "
            f"r = CliRunner().invoke(cli, ['info', {str(FIXTURES / 'adapters' / 'tiny-llama-lora')!r}, '--json']); "
            "assert r.exit_code == 0, r.output; assert json.loads(r.output)['modules'] == 14; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

"""RoPE scaling laws (Liu et al. 2023; Men et al. 2024) against brute-force definitions, and `longkit rope bound`."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from longkit.cli import app
from longkit.errors import MethodError
from longkit.tools import scaling_laws as sl

runner = CliRunner()


def brute_decay(d: int, base: float, max_len: int) -> list[float]:
    """Men et al.'s B_m = sum_i cos(m theta_i), one position and one pair at a time."""
    thetas = [base ** (-2 * i / d) for i in range(d // 2)]
    return [sum(math.cos(m * t) for t in thetas) for m in range(max_len + 1)]


def brute_passes(d: int, base: float, max_len: int) -> bool:
    return min(brute_decay(d, base, max_len)) >= 0


@pytest.mark.parametrize(("d", "base", "train_len"), [
    (128, 1e4, 4096), (128, 5e5, 4096), (64, 1e6, 32768), (96, 1e4, 2048), (256, 1e7, 131072),
    (16, 100.0, 50), (8, 10.0, 10000), (128, 1e4, 5), (80, 2.5e5, 8000),
])
def test_critical_dimension_counts_the_dimensions_that_saw_a_full_period(d, base, train_len):
    # Pair i (dimensions 2i, 2i+1) saw a full period when its wavelength 2pi base^(2i/d) fits in T_train.
    full_period_pairs = sum(2 * math.pi * base ** (2 * i / d) < train_len for i in range(d // 2))
    assert sl.critical_dimension(d, base, train_len) == 2 * full_period_pairs


def test_critical_dimension_and_bound_of_llama2():
    # The survey's Liu et al. numbers for LLaMA 2 (d=128, 4K training): d_extra = 92 and, tuned with a larger
    # base at the same length, bounds of about 4.7K (1e4), 78K (5e5), 129K (1e6), 410K (5e6), 675K (1e7), 2.1M (5e7).
    assert sl.critical_dimension(128, 1e4, 4096) == 92
    for base, notes in [(1e4, 4.7e3), (5e5, 78e3), (1e6, 129e3), (5e6, 410e3), (1e7, 675e3), (5e7, 2.1e6)]:
        assert sl.extrapolation_bound(128, base, 4096, pretrain_base=1e4) == pytest.approx(notes, rel=0.03)


@pytest.mark.parametrize(("d", "base", "train_len"), [(128, 1e4, 4096), (64, 1e6, 32768), (16, 100.0, 50),
                                                      (256, 5e5, 8192)])
def test_extrapolation_bound_is_the_wavelength_of_the_critical_dimension(d, base, train_len):
    d_extra = sl.critical_dimension(d, base, train_len)
    bound = sl.extrapolation_bound(d, base, train_len)
    assert bound == pytest.approx(2 * math.pi * base ** (d_extra / d), rel=1e-12)
    assert bound >= train_len
    assert bound == pytest.approx(float(sl.wavelengths(d, base)[d_extra // 2]), rel=1e-12)


def test_every_dimension_seen_gives_the_longest_wavelength():
    assert sl.critical_dimension(8, 10.0, 10000) == 8
    assert sl.extrapolation_bound(8, 10.0, 10000) == pytest.approx(2 * math.pi * 10.0)
    assert sl.bound_report(8, 10.0, 10000)["liu_unbounded"] is True


@pytest.mark.parametrize(("d", "train_len", "target"), [(128, 4096, 131072), (128, 4096, 1 << 20), (64, 8192, 100000),
                                                        (128, 4096, 4096)])
def test_base_for_length_inverts_the_bound(d, train_len, target):
    base = sl.base_for_length(d, train_len, target, pretrain_base=1e4)
    # The critical dimension stays the pre-trained model's (dims that saw a full period at base 1e4, T_train);
    # at the new base, the bound reaches the target.
    bound = sl.extrapolation_bound(d, base, train_len, pretrain_base=1e4)
    assert bound == pytest.approx(target, rel=1e-9)
    d_extra = sl.critical_dimension(d, 1e4, train_len)
    assert base == pytest.approx((target / (2 * math.pi)) ** (d / d_extra), rel=1e-12)


def test_base_for_length_matches_the_survey_constants():
    # "Minimum base: 128k needs ~1.0e6; 1M needs ~1.8e7" (Liu et al. via the survey, d=128, 4K, base 1e4).
    assert sl.base_for_length(128, 4096, 131072) == pytest.approx(1.0e6, rel=0.05)
    assert sl.base_for_length(128, 4096, 1 << 20) == pytest.approx(1.8e7, rel=0.05)


def test_wavelengths_and_frequencies():
    theta = sl.frequencies(8, 10000.0)
    assert theta.dtype == torch.float64
    assert theta.tolist() == pytest.approx([1.0, 0.1, 0.01, 0.001], rel=1e-12)
    assert sl.wavelengths(8, 10000.0).tolist() == pytest.approx([2 * math.pi * 10 ** k for k in range(4)], rel=1e-12)


def test_decay_curve_matches_a_double_loop(monkeypatch):
    expected = brute_decay(16, 500.0, 300)
    assert sl.decay_curve(16, 500.0, 300).tolist() == pytest.approx(expected, abs=1e-12)
    # The same across chunk boundaries.
    monkeypatch.setattr(sl, "_CHUNK_ELEMENTS", 8 * 7)
    assert sl.decay_curve(16, 500.0, 300).tolist() == pytest.approx(expected, abs=1e-12)
    assert float(sl.decay_curve(128, 1e4, 10)[0]) == 64.0


@pytest.mark.parametrize(("d", "base", "max_len"), [(16, 500.0, 400), (32, 3000.0, 2000), (128, 1e4, 3000)])
def test_first_negative_is_the_first_negative_of_the_double_loop(d, base, max_len):
    values = brute_decay(d, base, max_len)
    expected = next((m for m, v in enumerate(values) if v < 0), None)
    assert sl.first_negative(d, base, max_len) == expected
    if expected is not None:
        assert sl.first_negative(d, base, expected - 1) is None


@pytest.mark.parametrize(("d", "target"), [(16, 200), (32, 500), (64, 1000), (128, 300)])
def test_min_base_passes_and_just_below_fails(d, target):
    rtol = 1e-6
    base = sl.min_base_for_length(d, target, rtol=rtol)
    assert brute_passes(d, base, target)
    assert not brute_passes(d, base * (1 - rtol), target)


def test_min_base_is_the_smallest_passing_base_on_a_fine_grid():
    # d=32, L=300: the first passing window is only 0.65% wide, and passing/failing alternate 7 times above it.
    d, target = 32, 300
    best = sl.min_base_for_length(d, target)
    assert brute_passes(d, best, target)
    # Every base of a 0.02% log grid below the result fails somewhere on [0, L] (checked without the search).
    grid = torch.exp(torch.arange(math.log(1.0002), math.log(best * (1 - 1e-6)), 2e-4, dtype=torch.float64))
    m = torch.arange(target + 1, dtype=torch.float64)
    exponents = -torch.arange(0, d, 2, dtype=torch.float64) / d
    for chunk in grid.split(500):
        # (G, d/2) -> (G, L+1, d/2) -> (G, L+1)
        theta = chunk[:, None] ** exponents[None, :]
        values = torch.cos(m[None, :, None] * theta[:, None, :]).sum(-1)
        assert bool((values.min(dim=1).values < 0).all())


def test_passing_bases_are_not_an_interval():
    # Why the minimum is a walk and not a bisection: for d=128 and L=4096 bases just above it fail again.
    best = sl.min_base_for_length(128, 4096)
    assert 26900 < best < 27000
    assert sl.first_negative(128, best, 4096) is None
    assert sl.first_negative(128, 28000.0, 4096) is not None
    assert sl.first_negative(128, 1e6, 4096) is None


def test_min_base_grows_with_the_length():
    bases = [sl.min_base_for_length(64, n) for n in (100, 200, 400, 800, 1600)]
    assert bases == sorted(bases) and bases[0] < bases[-1]
    assert sl.min_base_for_length(64, 1) == 1.0


def test_one_thread_restores_the_thread_count():
    before = torch.get_num_threads()
    sl.min_base_for_length(16, 50)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize(("call", "name"), [
    (lambda: sl.critical_dimension(7, 1e4, 4096), "'head_dim' must be an even integer >= 2"),
    (lambda: sl.critical_dimension(0, 1e4, 4096), "'head_dim' must be an even integer >= 2"),
    (lambda: sl.wavelengths(True, 1e4), "'head_dim'"),
    (lambda: sl.critical_dimension(128, 1.0, 4096), "'base' must be a finite number > 1"),
    (lambda: sl.extrapolation_bound(128, float("nan"), 4096), "'base' must be a finite number > 1"),
    (lambda: sl.critical_dimension(128, 1e4, 0), "'train_len' must be an integer >= 1"),
    (lambda: sl.base_for_length(128, 4096, 0), "'target_len' must be an integer >= 1"),
    (lambda: sl.min_base_for_length(128, 0), "'target_len' must be an integer >= 1"),
    (lambda: sl.min_base_for_length(2, 10), "'head_dim' must be >= 4"),
    (lambda: sl.min_base_for_length(128, 10, rtol=0.5), "'rtol' must be in (0, 0.001]"),
    (lambda: sl.base_for_length(128, 4096, 5), "'target_len' must be >= 7"),
    (lambda: sl.extrapolation_bound(128, 1e6, 4096, pretrain_base=0.5), "'pretrain_base' must be a finite number > 1"),
    (lambda: sl.bound_report(128, 1e4, 4096, target_len=-3), "'target_len' must be an integer >= 1"),
])
def test_bad_input_names_the_parameter_and_range(call, name):
    with pytest.raises(MethodError, match="parameter " + name.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        call()


def test_bound_report_is_json_and_consistent():
    report = sl.bound_report(128, 1e4, 4096, target_len=8192)
    assert json.loads(json.dumps(report)) == report
    assert report["critical_dimension"] == 92
    first = report["men_first_negative"]
    assert first == sl.first_negative(128, 1e4, 4 * 8192)
    assert report["men_covers_target"] == (first is None or first > 8192)
    assert report["liu_covers_target"] is False
    assert report["liu_base_for_target"] == pytest.approx(sl.base_for_length(128, 4096, 8192))
    assert report["men_min_base_for_target"] == sl.min_base_for_length(128, 8192)


def test_plot_writes_a_png(tmp_path):
    path = sl.plot_wavelengths(64, 5e5, 4096, 32768, tmp_path / "sub" / "waves.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_json():
    out = runner.invoke(app, ["rope", "bound", "--head-dim", "128", "--base", "10000", "--train-len", "4k", "--json"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.stdout)
    assert {"critical_dimension", "extrapolation_bound", "men_first_negative", "liu_base_for_target",
            "men_min_base_for_target", "papers"} <= set(report)
    assert report["critical_dimension"] == 92 and report["train_len"] == 4096
    assert report["extrapolation_bound"] == pytest.approx(2 * math.pi * 1e4 ** (92 / 128))


def test_cli_table_target_and_plot(tmp_path):
    png = tmp_path / "waves.png"
    out = runner.invoke(app, ["rope", "bound", "--train-len", "2k", "--target-len", "8k", "--plot", str(png)])
    assert out.exit_code == 0, out.output
    assert "critical dimension" in out.stdout and "min base for target" in out.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_reads_a_model():
    out = runner.invoke(app, ["rope", "bound", "--model", "tiny-llama", "--json"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.stdout)
    # tiny-llama: hidden 64 / 4 heads, rope_theta 1e4, 512 positions.
    assert (report["head_dim"], report["base"], report["train_len"]) == (16, 1e4, 512)


@pytest.mark.parametrize(("args", "name"), [
    (["--head-dim", "7"], "head_dim"), (["--head-dim", "0"], "head_dim"), (["--base", "1"], "base"),
    (["--train-len", "0"], "train_len"), (["--train-len", "4x"], "train_len"), (["--target-len", "0"], "target_len"),
])
def test_cli_bad_input_exits_2_naming_the_parameter(args, name):
    out = runner.invoke(app, ["rope", "bound", *args])
    assert out.exit_code == 2
    assert f"'{name}'" in out.output

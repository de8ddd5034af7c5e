"""benchmarks/prefill.py at a small shape: every format gets a row per row count, and "auto picks" is the path its
backend declares for that row count (the figures themselves are the benchmark's, not the test's)."""
from benchmarks import prefill
from sat_quant.engine.backends import select_backend
from sat_quant.engine.formats import FORMATS


def test_prefill_section_has_a_row_per_format_and_row_count_and_names_the_switch():
    text = prefill.run(shapes=[(256, 128)], rows=[8, 600], ladder=[8, 700], formats=("int4", "int8", "nf4"))
    table = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| int") or line.startswith("| nf")]
    assert len(table) == 6
    for cells in table:
        fmt, backend, rows, picks = cells[0].strip(), cells[1].strip(), int(cells[2]), cells[7].strip()
        chosen = select_backend("auto", FORMATS[fmt], FORMATS[fmt].spec(256, 128), "cpu")
        threshold = chosen.prefill_rows.get((FORMATS[fmt].kernel_layout, "cpu"))
        assert backend == chosen.name
        assert picks == ("prefill" if threshold is not None and rows >= threshold else "kernel"), cells
        assert float(cells[-1].strip().rstrip("x")) > 0
    assert sum(line.startswith("- ") for line in text.splitlines()) == 3

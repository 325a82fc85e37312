"""utils/progress.Progress off a terminal: one readable line per update (count, rate, ETA), no bar."""

from egrsd_megatron.utils import progress as progress_mod
from egrsd_megatron.utils.progress import Progress


def test_plain_lines_off_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(progress_mod, "interactive", lambda: False)
    p = Progress(4, initial=1, desc="synth", unit="sample")
    p.update(2)
    p.update(1)
    p.close()
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert [ln.split(",")[0] for ln in lines] == ["synth: 3/4 samples", "synth: 4/4 samples"]
    assert "ETA" in lines[0] and "ETA 0s" in lines[1]
    assert "\r" not in out and err == ""

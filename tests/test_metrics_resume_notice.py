"""The resume notice about lost metrics rows speaks only when rows were written and are gone."""

from __future__ import annotations

from largebatch.metrics import CSV_COLUMNS, MetricsWriter

HEADER = ",".join(CSV_COLUMNS) + "\r\n"


def reopen(run_dir, step):
    notices: list[str] = []
    MetricsWriter(run_dir, resume_after_step=step, notice=notices.append).close()
    return notices


def test_a_stop_before_the_first_log_step_resumes_without_claiming_lost_rows(tmp_path):
    # a run stopped at step 1 with log_every=1000 never wrote a row: both files hold nothing yet
    (tmp_path / "metrics.jsonl").write_text("")
    (tmp_path / "metrics.csv").write_text(HEADER)
    assert reopen(tmp_path, 1) == []


def test_rows_gone_from_metrics_jsonl_but_kept_in_metrics_csv_are_announced(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    (tmp_path / "metrics.csv").write_text(HEADER + "train,1,0.25,0.1,1.0,10,0,1,,,\r\n")
    assert reopen(tmp_path, 1) == [f"{tmp_path / 'metrics.jsonl'} is empty: its rows up to step 1 are lost "
                                   "(metrics.csv keeps its own)"]


def test_both_records_missing_after_a_checkpoint_are_announced(tmp_path):
    assert reopen(tmp_path, 3) == [f"{tmp_path / 'metrics.jsonl'} is missing: its rows up to step 3 are lost"]

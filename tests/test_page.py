"""The status page: what a person sees, and nothing a client can inject."""

import re
from html.parser import HTMLParser

from wandb_offline_sync.page import describe_duration, last_error, render

NOW = 1_800_000_000.0
RUN_URL = "https://wandb.example/team/project/runs/abc123"


def _farm(**extra):
    farm = {"version": "0.1.0", "wandb": "wandb, version 0.31.0",
            "started": NOW - 3 * 3600 - 5 * 60, "num_threads": 5,
            "sync_timeout": 900.0, "allow_roots": ["/scratch/me"]}
    farm.update(extra)
    return farm


def _run(**extra):
    run = {"run_id": "abc123",
           "run_dir": "/scratch/me/wandb/offline-run-20261203_120000-abc123",
           "state": "idle", "final_requested": False,
           "follow_up_pending": False, "requests": 4, "attempts": 3,
           "failures_in_a_row": 0, "last_request": NOW - 50,
           "last_success": NOW - 42, "next_retry": None,
           "run_url": RUN_URL,
           "last_attempt": {"started": NOW - 45, "ended": NOW - 42,
                            "exit_code": 0, "timed_out": False,
                            "outcome": "ok", "reason": "synced",
                            "stderr_tail": []}}
    run.update(extra)
    return run


class _Cells(HTMLParser):
    """The text of each table row, cell by cell."""

    def __init__(self):
        super().__init__()
        self.rows = []
        self._cell = None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _rows(page):
    parser = _Cells()
    parser.feed(page)
    return parser.rows


def _run_row(page, run_id):
    return next(row for row in _rows(page) if row[0].startswith(run_id))


def test_page_shows_each_run_with_its_age_and_attempts():
    page = render({"farm": _farm(), "runs": [_run()]}, now=NOW)

    row = _run_row(page, "abc123")
    assert "offline-run-20261203_120000-abc123" in row[0]
    assert row[1] == "idle"
    assert row[2] == "42 s ago"
    assert row[3] == ""
    assert row[4] == "3"
    assert row[5] == "no"


def test_header_shows_versions_and_uptime():
    page = render({"farm": _farm(), "runs": [_run()]}, now=NOW)

    header = dict(row for row in _rows(page) if len(row) == 2)
    assert header["farm version"] == "0.1.0"
    assert header["wandb"] == "wandb, version 0.31.0"
    assert header["up for"] == "3 h 5 min"


def test_page_refreshes_itself_every_ten_seconds():
    page = render({"farm": _farm(), "runs": []}, now=NOW)

    assert '<meta http-equiv="refresh" content="10">' in page


def test_failed_attempt_shows_its_reason_in_plain_words():
    run = _run(state="retry_wait", next_retry=NOW + 30, last_success=None,
               last_attempt={"started": NOW - 5, "ended": NOW - 1,
                             "exit_code": 0, "timed_out": False,
                             "outcome": "transient",
                             "reason": "W&B could not be reached",
                             "stderr_tail": ["wandb: ERROR dial tcp"]})
    page = render({"farm": _farm(), "runs": [run]}, now=NOW)

    row = _run_row(page, "abc123")
    assert row[1] == "retry_wait (retry in 30 s)"
    assert row[2] == "never"
    assert row[3] == "W&B could not be reached"


def test_run_link_is_shown_when_the_farm_knows_it():
    known = render({"farm": _farm(), "runs": [_run()]}, now=NOW)
    unknown = render({"farm": _farm(), "runs": [_run(run_url=None)]},
                     now=NOW)

    assert '<a href="%s">' % RUN_URL in known
    assert RUN_URL not in unknown
    assert _run_row(unknown, "abc123")[6] == "not known yet"


def test_hostile_values_are_escaped():
    hostile = '<script>alert("x")</script>'
    run = _run(run_id=hostile, run_dir="/scratch/" + hostile,
               state=hostile, run_url='https://x/"><script>',
               last_attempt={"outcome": "transient", "reason": hostile})
    page = render({"farm": _farm(version=hostile, wandb=hostile,
                                 allow_roots=[hostile]),
                   "runs": [run]}, now=NOW)

    assert "<script" not in page
    assert "&lt;script&gt;" in page
    assert 'href="https://x/&quot;&gt;&lt;script&gt;"' in page


def test_links_with_other_schemes_are_not_made_links():
    page = render({"farm": _farm(),
                   "runs": [_run(run_url="javascript:alert(1)")]}, now=NOW)

    assert "javascript:" not in page


def test_page_loads_nothing_from_elsewhere():
    page = render({"farm": _farm(), "runs": [_run(), _run(run_id="b2")]},
                  now=NOW)

    assert "src=" not in page
    assert "<script" not in page.lower()
    assert "@import" not in page and "url(" not in page
    external = re.findall(r'href="(https?:[^"]*)"', page)
    assert external == [RUN_URL, RUN_URL]


def test_live_run_shows_how_long_it_has_been_followed_and_its_error():
    run = _run(mode="live", state="live", last_success=None,
               last_attempt=None,
               live={"alive": True, "pid": 4242, "started": NOW - 300,
                     "restarts": 1, "error_lines": 2,
                     "last_error": "wandb: ERROR <upload> retrying",
                     "next_restart": None})
    page = render({"farm": _farm(mode="live"), "runs": [run]}, now=NOW)

    row = _run_row(page, "abc123")
    assert row[1] == "live"
    assert row[2] == "live for 5 min"
    assert row[3] == "wandb: ERROR <upload> retrying"
    header = dict(r for r in _rows(page) if len(r) == 2)
    assert header["sync mode"] == "live"


def test_run_the_farm_finished_after_its_job_went_quiet_says_so():
    page = render({"farm": _farm(),
                   "runs": [_run(state="done", went_quiet=True,
                                 final_requested=True)]}, now=NOW)

    row = _run_row(page, "abc123")
    assert row[1].startswith("done (crashed? the job went quiet")
    assert row[5] == "yes"


def test_empty_farm_says_there_are_no_runs():
    page = render({"farm": _farm(), "runs": []}, now=NOW)

    assert "No runs yet" in page
    assert "<td" in page             # the header table is still there


def test_missing_and_unknown_keys_do_not_break_the_page():
    run = {"run_id": "x1", "mode": "live", "live": {"lag": 3}}
    page = render({"farm": {"mode": "live"}, "runs": [run],
                   "extra": [1, 2]}, now=NOW)

    row = _run_row(page, "x1")
    assert row[1] == "unknown"
    assert row[2] == "never"
    assert row[6] == "not known yet"
    assert render({}, now=NOW)


def test_durations_are_rounded_to_a_readable_unit():
    assert describe_duration(0) == "0 s"
    assert describe_duration(-5) == "0 s"
    assert describe_duration(119.9) == "119 s"
    assert describe_duration(180) == "3 min"
    assert describe_duration(2 * 3600 + 61) == "2 h 1 min"
    assert describe_duration(30 * 3600) == "30 h"
    assert describe_duration(5 * 86400) == "5 days"


def test_last_error_is_empty_after_a_success_or_before_any_attempt():
    assert last_error(_run()) == ""
    assert last_error(_run(last_attempt=None)) == ""
    assert last_error(_run(last_attempt={"outcome": "transient",
                                         "timed_out": True})) \
        == "the sync did not finish in time"

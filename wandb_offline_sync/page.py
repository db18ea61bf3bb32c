"""The farm's status page: the ``/status`` JSON as HTML a person reads.

:func:`render` is a pure function from the status dict to a page: a header
with the farm's version, the wandb version and the uptime, then a table
with one row per run.  The page reloads itself every
:data:`REFRESH_SECONDS` and needs nothing beyond itself (no scripts, no
style sheets or images from elsewhere), so it works in a text browser on a
login node.  Every value is HTML-escaped: run directories and error texts
come from clients and from wandb's output.

Serving the page (auth, headers) is left to the server; the wording of
ages and errors (:func:`describe_duration`, :func:`describe_last_sync`,
:func:`last_error`) is shared with the ``wandb_sync_farm status``
command.
"""

import html
import time

__all__ = ["render", "describe_duration", "describe_last_sync",
           "last_error", "REFRESH_SECONDS"]

#: Seconds between the page's reloads of itself.
REFRESH_SECONDS = 10

# Only these schemes become links; anything else from a client is text.
_LINK_SCHEMES = ("https://", "http://")

# Row classes for the states the scheduler knows; others get no colour.
_STATE_CLASSES = {
    "queued": "busy", "syncing": "busy", "retry_wait": "warn",
    "idle": "ok", "done": "ok", "failed": "bad",
}

_STYLE = """
body { font-family: sans-serif; margin: 1em 2em; color: #222; }
table { border-collapse: collapse; width: 100%; }
th, td { border-bottom: 1px solid #ccc; padding: 0.3em 0.6em;
         text-align: left; vertical-align: top; }
th { background: #eee; }
td.num { text-align: right; }
small { color: #666; word-break: break-all; }
tr.ok td.state { color: #176117; }
tr.busy td.state { color: #1f4f99; }
tr.warn td.state { color: #8a5a00; }
tr.bad td.state, tr.bad td.error { color: #a11; font-weight: bold; }
"""


def render(status, now=None):
    """Return the HTML page for a ``/status`` dict.

    ``now`` (epoch seconds, default the current time) is what ages and
    the uptime are measured from.  Keys this page does not know are
    ignored, and missing ones are shown as unknown.
    """
    if now is None:
        now = time.time()
    farm = status.get("farm") or {}
    runs = status.get("runs") or []

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta http-equiv="refresh" content="%d">' % REFRESH_SECONDS,
        "<title>wandb_sync_farm: %s</title>" % _escape(_summary(runs)),
        "<style>%s</style>" % _STYLE,
        "</head>",
        "<body>",
        "<h1>wandb_sync_farm</h1>",
    ]
    parts.extend(_header(farm, runs, now))
    if runs:
        parts.extend(_table(runs, now))
    else:
        parts.append("<p>No runs yet. A run appears here when its agent "
                     "first asks for a sync.</p>")
    parts.append("<p><small>This page reloads every %d seconds. The same "
                 "as JSON: <a href=\"/status\">/status</a>.</small></p>"
                 % REFRESH_SECONDS)
    parts.extend(["</body>", "</html>", ""])
    return "\n".join(parts)


def describe_duration(seconds):
    """A short, rounded-down duration: ``"42 s"``, ``"3 min"``, ``"5 h"``.

    Negative durations (a clock that went back) count as zero.
    """
    seconds = max(0, int(seconds))
    if seconds < 120:
        return "%d s" % seconds
    minutes = seconds // 60
    if minutes < 120:
        return "%d min" % minutes
    hours = minutes // 60
    if hours < 10:
        return "%d h %d min" % (hours, minutes % 60)
    if hours < 48:
        return "%d h" % hours
    return "%d days" % (hours // 24)


def describe_last_sync(run, now, suffix=" ago"):
    """When the run's data last reached W&B, in words.

    ``"42 s ago"`` after a sync, ``"never"`` before the first, and
    ``"live for 3 min"`` while a live sync follows the run (wandb's live
    sync does not say when it last sent data, only that it runs).
    """
    live = run.get("live")
    if run.get("state") == "live" and isinstance(live, dict) \
            and live.get("alive"):
        started = _number(live.get("started"))
        if started is None:
            return "live"
        return "live for %s" % describe_duration(now - started)
    when = _number(run.get("last_success"))
    if when is None:
        return "never"
    return describe_duration(now - when) + suffix


def last_error(run):
    """What last went wrong with the run's syncs, or ``""``.

    While a live sync runs, the last error it printed; otherwise the
    reason the last attempt did not succeed.
    """
    live = run.get("live")
    if run.get("state") == "live" and isinstance(live, dict) \
            and live.get("last_error"):
        return str(live["last_error"])
    attempt = run.get("last_attempt")
    if not isinstance(attempt, dict) or attempt.get("outcome") == "ok":
        return ""
    reason = attempt.get("reason")
    if reason:
        return str(reason)
    if attempt.get("timed_out"):
        return "the sync did not finish in time"
    if attempt.get("outcome"):
        return "the last sync failed (%s)" % attempt["outcome"]
    return ""


# -- pieces of the page --------------------------------------------------


def _escape(value):
    return html.escape("" if value is None else str(value), quote=True)


def _summary(runs):
    """``"3 runs: 1 failed, 2 idle"``, for the title and the header."""
    counts = {}
    for run in runs:
        state = str(run.get("state") or "unknown")
        counts[state] = counts.get(state, 0) + 1
    text = "1 run" if len(runs) == 1 else "%d runs" % len(runs)
    if counts:
        text += ": " + ", ".join("%d %s" % (counts[state], state)
                                 for state in sorted(counts))
    return text


def _header(farm, runs, now):
    started = _number(farm.get("started"))
    uptime = "unknown" if started is None else \
        describe_duration(now - started)
    items = [
        ("farm version", farm.get("version") or "unknown"),
        ("wandb", farm.get("wandb") or "unknown"),
        ("up for", uptime),
        ("sync mode", farm.get("mode") or "periodic"),
        ("syncs at once", farm.get("num_threads", "unknown")),
        ("runs", _summary(runs)),
    ]
    roots = farm.get("allow_roots")
    if isinstance(roots, list) and roots:
        items.append(("syncs runs under", ", ".join(map(str, roots))))
    lines = ["<table>"]
    for label, value in items:
        lines.append("<tr><th>%s</th><td>%s</td></tr>"
                     % (_escape(label), _escape(value)))
    lines.append("</table>")
    lines.append("<h2>Runs</h2>")
    return lines


def _table(runs, now):
    lines = [
        "<table>",
        "<tr><th>Run</th><th>State</th><th>Last data reached W&amp;B</th>"
        "<th>Last error</th><th>Attempts</th><th>Final requested</th>"
        "<th>W&amp;B page</th></tr>",
    ]
    # Newest request first: the runs still going are the ones looked for.
    runs = sorted((r for r in runs if isinstance(r, dict)),
                  key=lambda r: _number(r.get("last_request")) or 0,
                  reverse=True)
    for run in runs:
        lines.append(_row(run, now))
    lines.append("</table>")
    return lines


def _row(run, now):
    css = _STATE_CLASSES.get(str(run.get("state")), "")
    cells = [
        "<td>%s<br><small>%s</small></td>"
        % (_escape(run.get("run_id") or "(no id)"),
           _escape(run.get("run_dir") or "")),
        '<td class="state">%s</td>' % _escape(_state(run, now)),
        "<td>%s</td>" % _escape(describe_last_sync(run, now)),
        '<td class="error">%s</td>' % _escape(last_error(run)),
        '<td class="num">%s</td>' % _escape(run.get("attempts", "")),
        "<td>%s</td>" % ("yes" if run.get("final_requested") else "no"),
        "<td>%s</td>" % _link(run.get("run_url")),
    ]
    return '<tr class="%s">%s</tr>' % (css, "".join(cells))


def _state(run, now):
    text = str(run.get("state") or "unknown")
    retry = _number(run.get("next_retry"))
    if retry is not None:
        text += " (retry in %s)" % describe_duration(retry - now)
    if run.get("follow_up_pending"):
        text += " (another sync queued)"
    if run.get("went_quiet"):
        text += " (crashed? the job went quiet; the farm finished the run)"
    return text


def _link(url):
    if not isinstance(url, str) or not url.startswith(_LINK_SCHEMES):
        return "not known yet"
    return '<a href="%s">open on W&amp;B</a>' % _escape(url)


def _number(value):
    """``value`` as a float, or None when it is not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)

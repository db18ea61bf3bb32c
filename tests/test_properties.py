"""Properties of the request checks, over inputs hypothesis makes up.

``parse_sync_request`` and ``RunDirPolicy.locate`` see whatever a client
sends; whatever that is, they may only refuse it with the package's own
errors, and what they accept must satisfy the rules the farm relies on.
``map_path`` rewrites prefixes by path components, never by characters.
"""

import json
import os
import re
from urllib.parse import urlencode

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from wandb_offline_sync import protocol
from wandb_offline_sync.errors import BadRequest, RequestError
from wandb_offline_sync.rundirs import RunDirPolicy

from conftest import make_run_dir

# Bounded, and without a database: the file stays under a few seconds and
# writes nothing beside the tests.
BOUNDED = settings(max_examples=200, deadline=None, database=None,
                   suppress_health_check=[HealthCheck.too_slow])

# map_path is pure string work; fewer examples cover it.
BOUNDED_PURE = settings(BOUNDED, max_examples=100)

RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,128}\Z")


# -- parse_sync_request --------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats()
    | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)

field_names = st.sampled_from(["run_dir", "run_id", "final"]) | \
    st.text(max_size=8)

path_like = st.sampled_from(["/", "/tmp/x", "relative", "", "/a\x00b",
                             "/\ud800", "/" + "p" * 5000, "/é/ü"]) | \
    st.text(max_size=40).map(lambda t: "/" + t)

field_values = path_like | json_values | st.sampled_from(
    ["abc123", "abc\n", "../x", "true", "false", "maybe", "1", ""])

request_dicts = st.dictionaries(field_names, field_values, max_size=5)

bodies = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    request_dicts.map(lambda d: json.dumps(d).encode("utf-8")),
    json_values.map(lambda v: json.dumps(v).encode("utf-8")),
    st.lists(st.tuples(field_names, st.text(max_size=30)), max_size=20)
    .map(lambda pairs: urlencode(pairs).encode("ascii")),
    st.text(alphabet="&=%+;run_dirfalsetru0123/", max_size=60)
    .map(lambda t: t.encode("ascii")),
)

content_types = st.sampled_from([
    None, "", "application/json", "application/x-www-form-urlencoded",
    "APPLICATION/JSON; charset=utf-8", " application/x-www-form-urlencoded;",
    "text/plain", "multipart/form-data; boundary=x", ";", "\x00"]) | \
    st.text(max_size=40)


@BOUNDED
@given(body=bodies, content_type=content_types)
@example(body=b'{"run_dir": "/x", "run_id": "abc\\n"}',
         content_type="application/json")
def test_parse_refuses_only_with_bad_request(body, content_type):
    try:
        request = protocol.parse_sync_request(body, content_type)
    except BadRequest as exc:
        assert str(exc)
        return

    assert isinstance(request.run_dir, str)
    assert os.path.isabs(request.run_dir)
    assert "\x00" not in request.run_dir
    assert len(request.run_dir) <= protocol.MAX_PATH_CHARS
    assert request.run_id is None or RUN_ID.match(request.run_id)
    assert isinstance(request.final, bool)


@BOUNDED
@given(fields=request_dicts)
def test_json_and_form_encodings_mean_the_same(fields):
    strings = {k: v for k, v in fields.items()
               if isinstance(v, str) and "\ud800" not in v
               and k != "final"}

    def outcome(body, content_type):
        try:
            return protocol.parse_sync_request(body, content_type)
        except BadRequest:
            return "refused"

    as_json = outcome(json.dumps(strings).encode("utf-8"),
                      "application/json")
    as_form = outcome(urlencode(strings).encode("ascii"),
                      "application/x-www-form-urlencoded")
    if strings:
        assert as_json == as_form


# -- RunDirPolicy.locate -------------------------------------------------

@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """An allowed root with good and bad run directories, and an outside
    folder; returns (root, outside, names to build paths from)."""
    base = tmp_path_factory.mktemp("locate")
    root = base / "root"
    outside = base / "outside"
    root.mkdir()
    outside.mkdir()
    make_run_dir(root, "good")
    make_run_dir(root, "online", offline=False)
    away = make_run_dir(outside, "away")
    (root / "empty").mkdir()
    (root / "two").mkdir()
    for name in ("run-a.wandb", "run-b.wandb"):
        (root / "two" / name).write_bytes(b"")
    (root / "link-out").symlink_to(away)
    (root / "link-in").symlink_to(
        root / "wandb" / "offline-run-20261203_120000-good")
    (root / "loop-a").symlink_to(root / "loop-b")
    (root / "loop-b").symlink_to(root / "loop-a")
    (root / "symlog").mkdir()
    (root / "symlog" / "run-s.wandb").symlink_to(
        os.path.join(away, "run-away.wandb"))
    foreign = root / "foreign"
    foreign.mkdir()
    (foreign / "run-f.wandb").write_bytes(b"")
    os.chown(str(foreign), 12345, 12345)
    foreign_log = root / "foreign-log"
    foreign_log.mkdir()
    (foreign_log / "run-g.wandb").write_bytes(b"")
    os.chown(str(foreign_log / "run-g.wandb"), 12345, 12345)
    (root / "fifo").mkdir()
    os.mkfifo(str(root / "fifo" / "run-p.wandb"))
    (root / "notes.txt").write_text("not a run\n")
    (outside / "link-back").symlink_to(root)
    names = ["wandb", "offline-run-20261203_120000-good",
             "run-20261203_120000-online", "offline-run-20261203_120000-away",
             "empty", "two", "link-out", "link-in", "loop-a", "symlog",
             "foreign", "foreign-log", "fifo", "notes.txt", "files",
             "run-good.wandb", "run-s.wandb", "link-back", "outside",
             "root", "..", ".", ""]
    return str(root), str(outside), names


def _policy(tree):
    root = tree[0]
    return RunDirPolicy(allow_roots=[root], path_maps=[("/mapped", root)],
                        uid=os.getuid(), gids=[])


odd_components = st.sampled_from(
    ["x\x00y", "é", "\ud800", "\udc80", "a" * 300, "a\nb", " ", "~"])


@st.composite
def requested_paths(draw, tree):
    root, outside, names = tree
    prefix = draw(st.sampled_from(
        [root, outside, "/", "//", "/mapped", root + "/..", "relative",
         os.path.dirname(root), root + "//wandb"]))
    parts = draw(st.lists(st.sampled_from(names) | odd_components
                          | st.text(max_size=12), max_size=6))
    return "/".join([prefix] + parts)


def _check_accepted(location, root):
    real_root = os.path.realpath(root)
    run_dir = location.run_dir
    assert run_dir == os.path.realpath(run_dir)
    assert os.path.commonpath([real_root, run_dir]) == real_root
    logs = [n for n in os.listdir(run_dir)
            if n.startswith("run-") and n.endswith(".wandb")]
    assert len(logs) == 1
    assert location.wandb_file == os.path.join(run_dir, logs[0])
    assert os.path.isfile(location.wandb_file)
    assert not os.path.islink(location.wandb_file)
    assert os.stat(run_dir).st_uid == os.getuid()
    assert os.stat(location.wandb_file).st_uid == os.getuid()


def test_locate_accepts_the_good_runs(tree):
    root, _, _ = tree
    policy = _policy(tree)
    good = os.path.join(root, "wandb", "offline-run-20261203_120000-good")
    for given_path in (good, good + "/files", good + "/run-good.wandb",
                       root + "/link-in", "/mapped/wandb/" +
                       os.path.basename(good), good + "/./files/../"):
        location = policy.locate(given_path)
        assert location.run_dir == os.path.realpath(good)
        _check_accepted(location, root)


@BOUNDED
@given(data=st.data())
def test_locate_refuses_only_with_request_errors(tree, data):
    root, _, _ = tree
    policy = _policy(tree)
    requested = data.draw(requested_paths(tree) | st.text(max_size=60))

    try:
        location = policy.locate(requested)
    except RequestError as exc:
        assert str(exc)
        return

    _check_accepted(location, root)


@BOUNDED
@given(requested=st.one_of(st.integers(), st.none(), st.binary(max_size=9),
                           st.lists(st.text(max_size=3), max_size=2)))
def test_locate_refuses_what_is_not_a_string(tree, requested):
    with pytest.raises(BadRequest):
        _policy(tree).locate(requested)


# -- RunDirPolicy.map_path -----------------------------------------------

component = st.text(alphabet="abcdefgXYZ0123_-.é", min_size=1,
                    max_size=8).filter(lambda c: c not in (".", ".."))
absolute = st.lists(component, min_size=1, max_size=4).map(
    lambda parts: "/" + "/".join(parts))
relative = st.lists(component, max_size=4).map("/".join)


def _mapper(source, target):
    return RunDirPolicy(allow_roots=["/"], path_maps=[(source, target)])


@BOUNDED_PURE
@given(source=absolute, target=absolute, rest=relative,
       slashes=st.sampled_from(["/", "//", "///"]),
       lead=st.sampled_from(["", "/", "//"]))
def test_a_path_under_the_source_maps_under_the_target(
        source, target, rest, slashes, lead):
    mapped = _mapper(source, target).map_path(
        lead + source + slashes + rest)

    expected = os.path.join(target, rest) if rest else target
    assert mapped == os.path.normpath(expected)
    assert mapped == target or mapped.startswith(target + "/")


@BOUNDED_PURE
@given(source=absolute, target=absolute, rest=relative,
       suffix=component)
def test_a_path_sharing_only_characters_is_not_mapped(
        source, target, rest, suffix):
    requested = source + suffix + ("/" + rest if rest else "")

    assert _mapper(source, target).map_path(requested) == \
        os.path.normpath(requested)


@BOUNDED_PURE
@given(source=absolute, target=absolute, elsewhere=absolute)
def test_dot_dot_counts_as_leaving_the_source(source, target, elsewhere):
    # Enough ".." to climb from the source to "/", then somewhere else:
    # mapped only if that place is itself under the source.
    climb = "/..".join([""] * (source.count("/") + 1))
    policy = _mapper(source, target)

    assert policy.map_path(source + climb + elsewhere) == \
        policy.map_path(elsewhere)


@BOUNDED_PURE
@given(outer=absolute, inner=component, rest=relative,
       targets=st.tuples(absolute, absolute))
def test_the_longest_source_wins(outer, inner, rest, targets):
    policy = RunDirPolicy(
        allow_roots=["/"],
        path_maps=[(outer, targets[0]), (outer + "/" + inner, targets[1])])

    mapped = policy.map_path(outer + "/" + inner + "/" + rest)

    assert mapped == os.path.normpath(os.path.join(targets[1], rest))

"""A tiny parser for the Prometheus text exposition format, strict enough to catch format
mistakes (each rule is an assertion), and a lookup of one sample.

Shared by ``tests/unit/test_metrics.py`` (the rendered text), ``tests/unit/test_verify.py`` and
the integration tests that scrape a real daemon's ``/metrics`` (``tests/integration/helpers.py``).
"""

import math
import re

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(r"^(%s)(?:\{(.*)\})? (\S+)$" % _NAME)
_LABEL = re.compile(r'(%s)="((?:[^"\\]|\\.)*)"(,|$)' % r"[a-zA-Z_][a-zA-Z0-9_]*")


def _unescape(text):
    return re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), text)


def _labels(text):
    out, pos = {}, 0
    while pos < len(text):
        m = _LABEL.match(text, pos)
        assert m, "bad label set %r at %d" % (text, pos)
        assert m.group(1) not in out, "duplicate label %s" % m.group(1)
        out[m.group(1)] = _unescape(m.group(2))
        pos = m.end()
    return out


def _number(text):
    if text in ("+Inf", "-Inf", "NaN"):
        return float(text.replace("Inf", "inf").replace("NaN", "nan"))
    return float(text)


def parse(text):
    """``{family: {"type", "help", "samples": [(name, labels, value)]}}``; asserts the format rules."""
    assert text.endswith("\n")
    families, current = {}, None
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            _, what, name, rest = line.split(" ", 3)
            fam = families.setdefault(name, {"samples": []})
            key = what.lower()
            assert key not in fam, "%s %s twice" % (what, name)
            assert not fam["samples"], "%s of %s after its samples" % (what, name)
            fam[key] = rest
            current = name
            continue
        assert not line.startswith("#") and line.strip(), "unexpected line %r" % line
        m = _SAMPLE.match(line)
        assert m, "bad sample line %r" % line
        name, labels, value = m.group(1), _labels(m.group(2) or ""), _number(m.group(3))
        base = current
        if families[current].get("type") == "histogram":
            assert name in (base + "_bucket", base + "_sum", base + "_count"), line
        else:
            assert name == base, "sample %s outside its family %s" % (name, base)
        families[current]["samples"].append((name, labels, value))
    for name, fam in families.items():
        assert "help" in fam and "type" in fam, name
        assert fam["type"] in ("counter", "gauge", "histogram", "summary", "untyped")
        seen = [(n, tuple(sorted(l.items()))) for n, l, _ in fam["samples"]]
        assert len(seen) == len(set(seen)), "duplicate series in %s" % name
        if fam["type"] == "histogram":
            _check_histogram(name, fam["samples"])
    return families


def _check_histogram(name, samples):
    """Each series of the family (its labels other than ``le``, e.g. one per device) has sorted,
    cumulative buckets ending at +Inf with the series' count, one _count and one _sum."""
    series = {}
    for n, labels, v in samples:
        key = tuple(sorted((k, x) for k, x in labels.items() if k != "le"))
        entry = series.setdefault(key, {"buckets": [], "count": [], "sum": []})
        if n == name + "_bucket":
            entry["buckets"].append((_number(labels["le"]), v))
        elif n == name + "_count":
            entry["count"].append(v)
        elif n == name + "_sum":
            entry["sum"].append(v)
    for key, entry in series.items():
        assert len(entry["count"]) == 1 and len(entry["sum"]) == 1, (name, key)
        bounds = [b for b, _ in entry["buckets"]]
        assert bounds == sorted(bounds) and bounds and bounds[-1] == math.inf, (name, key, bounds)
        values = [v for _, v in entry["buckets"]]
        assert values == sorted(values), "buckets of %s%s not cumulative: %r" % (name, key, values)
        assert values[-1] == entry["count"][0], (name, key)


def value(families, name, **labels):
    samples = [s for fam in families.values() for s in fam["samples"]]
    matches = [v for n, l, v in samples if n == name and l == labels]
    assert len(matches) == 1, (name, labels, families[name]["samples"])
    return matches[0]

"""proxy/textsafe.py: what is escaped, what is kept, and that JSON lines stay the same JSON."""

from __future__ import annotations

import io
import json

from proxy.textsafe import SafeStream, json_line_safe, safe_lines, safe_text


def test_safe_text_escapes_every_control_and_line_breaker():
    for ch in ["\x00", "\x07", "\x1b", "\r", "\n", "\t", "\x7f", "\x85", "\x9b", "\u2028", "\u2029",
               "\u202e", "\u2066", "\u200f", "\ufeff"]:
        out = safe_text(f"a{ch}b")
        assert ch not in out and out == f"a\\u{ord(ch):04x}b"
    assert safe_text("Zoë, 東京, O'Neil \\x") == "Zoë, 東京, O'Neil \\x"  # printable text and backslashes untouched
    assert safe_text(None) == "" and safe_text(7) == "7"


def test_safe_lines_keeps_layout_but_not_escapes():
    assert safe_lines("a\tb\nc\x1b[2Jd\re") == "a\tb\nc\\u001b[2Jd\\u000de"


def test_json_line_safe_is_the_same_json_on_one_line():
    value = {"sql": "select 1\u2028--\u2029x\u0085y\x9b\u202e", "n": 1}
    line = json_line_safe(json.dumps(value, ensure_ascii=False))
    assert len(line.splitlines()) == 1 and json.loads(line) == value


def test_safe_stream_escapes_whatever_is_printed():
    buf = io.StringIO()
    s = SafeStream(buf)
    print("grant 7\x1b[1A: acme", file=s)
    assert buf.getvalue() == "grant 7\\u001b[1A: acme\n"

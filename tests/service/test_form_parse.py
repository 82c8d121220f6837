"""`parse_form`: a whole multipart body as its parts, read as Starlette's form parser
reads it, with the same limits and messages."""

from __future__ import annotations

import asyncio

import pytest
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from service.api.inputs import FormPart, parse_form
from service.errors import InvalidRequest, TooManyItems

CT = "multipart/form-data; boundary=b0"


def _part(name: str, value: bytes, filename: str | None = None,
          content_type: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"'
    if filename is not None:
        disposition += f'; filename="{filename}"'
    head = f"--b0\r\nContent-Disposition: {disposition}\r\n"
    if content_type is not None:
        head += f"Content-Type: {content_type}\r\n"
    return head.encode() + b"\r\n" + value + b"\r\n"


def _body(*parts: bytes) -> bytes:
    return b"".join(parts) + b"--b0--\r\n"


def _parse(body: bytes, content_type: str = CT, max_parts: int = 10,
           max_part_size: int = 1000) -> list[FormPart]:
    return parse_form(body, content_type, max_parts=max_parts, max_part_size=max_part_size)


def test_parts_come_back_in_order_files_as_bytes_and_fields_as_text():
    jpeg = b"\xff\xd8\xff\xe0" + bytes(range(256)) + b"\xff\xd9"
    body = _body(_part("images", jpeg, "0.jpg", "image/jpeg"), _part("encoding", b"base64"),
                 _part("images", b"second", "1.png", "image/png"))
    assert _parse(body) == [FormPart("images", "0.jpg", jpeg),
                            FormPart("encoding", None, "base64"),
                            FormPart("images", "1.png", b"second")]


def test_a_text_field_is_utf8_and_bytes_that_are_not_read_as_latin1():
    body = _body(_part("texts", "café ☕ 東京".encode()), _part("texts", b"\xff\xfe ok"))
    assert [p.value for p in _parse(body)] == ["café ☕ 東京", "ÿþ ok"]


def test_the_request_charset_decodes_names_and_fields():
    body = _body(_part("texts", "façade".encode("latin-1")))
    assert _parse(body, CT + "; charset=latin-1")[0].value == "façade"
    # An unknown charset falls back to latin-1 rather than failing.
    assert _parse(body, CT + "; charset=no-such-codec")[0].value == "façade"


def test_a_file_is_a_part_with_a_filename_whatever_its_content_type():
    body = _body(_part("images", b"raw", "a.bin"), _part("images", b"raw2", ""),
                 _part("texts", b"text", content_type="image/png"))
    assert _parse(body) == [FormPart("images", "a.bin", b"raw"), FormPart("images", "", b"raw2"),
                            FormPart("texts", None, "text")]


@pytest.mark.parametrize("value", [
    b"", b"\r\n", b"\r\n\r\n", b"--b0", b"--b0--\r\n", b"\r\n--b0x\r\n", b"\r\n--b", b"line\r",
    b"\r\n--b0-", b"a\r\nContent-Disposition: form-data\r\n\r\n",
])
def test_crlf_and_boundary_lookalikes_inside_a_part_are_data(value):
    body = _body(_part("images", value, "x"), _part("texts", b"after"))
    assert _parse(body) == [FormPart("images", "x", value), FormPart("texts", None, "after")]


def test_a_preamble_an_epilogue_and_a_quoted_boundary_are_accepted():
    body = b"\r\n" + _body(_part("texts", b"a")) + b"epilogue\r\n"
    assert _parse(body, 'multipart/form-data; boundary="b0"') == [FormPart("texts", None, "a")]


def test_files_and_fields_are_each_limited():
    files = [_part("images", b"x", f"{i}") for i in range(3)]
    fields = [_part("texts", b"t") for _ in range(3)]
    assert len(_parse(_body(*files, *fields), max_parts=3)) == 6
    for too_many in ([*files, _part("images", b"x", "3")], [*fields, _part("texts", b"t")]):
        with pytest.raises(TooManyItems, match="more than 3 parts of one kind"):
            _parse(_body(*too_many), max_parts=3)


def test_a_text_field_over_the_part_size_is_refused_but_a_file_is_not():
    assert _parse(_body(_part("texts", b"t" * 2048)), max_part_size=2048)[0].value == "t" * 2048
    with pytest.raises(InvalidRequest, match=r"multipart body: Part exceeded maximum size of 2KB"):
        _parse(_body(_part("texts", b"t" * 2049)), max_part_size=2048)
    assert _parse(_body(_part("images", b"i" * 4096, "a")), max_part_size=2048)[0].value == b"i" * 4096


@pytest.mark.parametrize(("body", "content_type", "message"), [
    (_body(_part("texts", b"a")), "multipart/form-data", "Missing boundary"),
    (b"not a form at all", CT, "Invalid multipart data"),
    (b"--b0\r\nContent-Disposition form-data\r\n\r\nx\r\n--b0--\r\n", CT, "Invalid multipart data"),
    (b"--b0\r\nContent-Type: text/plain\r\n\r\nx\r\n--b0--\r\n", CT, 'field "name" must be provided'),
    (b"--b0\r\n\r\nx\r\n--b0--\r\n", CT, 'field "name" must be provided'),
    (_body(_part("texts", b"a")), "multipart/form-data; boundary=" + "b" * 300,
     "Invalid multipart data"),
])
def test_malformed_bodies_are_invalid_requests(body, content_type, message):
    with pytest.raises(InvalidRequest, match=f"^multipart body: .*{message}"):
        _parse(body, content_type)


def test_an_unfinished_last_part_is_dropped():
    truncated = _part("texts", b"whole") + b'--b0\r\nContent-Disposition: form-data; name="x"\r\n\r\npart'
    assert _parse(truncated) == [FormPart("texts", None, "whole")]
    assert _parse(b"") == []


def _starlette(body: bytes, content_type: str, max_parts: int, max_part_size: int):
    """What `request.form()` made of the same body: its parts, or its error message."""
    async def stream():
        for i in range(0, len(body), 7):  # small chunks: the streaming path
            yield body[i:i + 7]
        yield b""

    async def parse():
        parser = MultiPartParser(Headers({"content-type": content_type}), stream(),
                                 max_files=max_parts, max_fields=max_parts,
                                 max_part_size=max_part_size)
        try:
            form = await parser.parse()
        except MultiPartException as e:
            return e.message
        return [FormPart(k, v.filename, await v.read()) if isinstance(v, UploadFile)
                else FormPart(k, None, v) for k, v in form.multi_items()]

    return asyncio.run(parse())


@pytest.mark.parametrize(("body", "content_type"), [
    (_body(_part("images", b"\x00\r\n--b0x\r\n\xff", "a.png", "image/png"), _part("texts", "ü".encode()),
           _part("texts", b"\xff"), _part("images", b"", "")), CT),
    (_body(_part("texts", "ü".encode("latin-1"))), CT + "; charset=iso-8859-1"),
    (b"\r\n\r\n" + _body(_part("a", b"1")) + b"junk", 'multipart/form-data; boundary="b0"'),
    (_body(*[_part("images", b"x", f"{i}") for i in range(4)]), CT),
    (_body(*[_part("texts", b"x") for i in range(4)]), CT),
    (_body(_part("texts", b"y" * 2049)), CT),
    (b"--b0\r\nContent-Type: text/plain\r\n\r\nx\r\n--b0--\r\n", CT),
    (b"garbage", CT),
    (_part("texts", b"whole") + b'--b0\r\nContent-Disposition: form-data; name="x"\r\n\r\npa', CT),
])
def test_parts_and_refusals_match_starlettes_form_parser(body, content_type):
    expected = _starlette(body, content_type, max_parts=3, max_part_size=2048)
    try:
        got: object = _parse(body, content_type, max_parts=3, max_part_size=2048)
    except TooManyItems:
        got = "Too many"
    except InvalidRequest as e:
        got = str(e).removeprefix("multipart body: ")
    if isinstance(expected, str) and expected.startswith("Too many"):
        expected = "Too many"
    assert got == expected

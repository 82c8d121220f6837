"""multipart/form-data on /embed, /classify and /similarity equals JSON on the same path."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from pydantic import BaseModel, Field
from test_api import (
    _b64,
    _png,
    client,  # noqa: F401  (the same tiny model's app, per module)
)

from service.api.schemas import (
    CLASSIFY_FORM,
    EMBED_FORM,
    SIMILARITY_FORM,
    ClassifyRequest,
    EmbedRequest,
    FormField,
    FormSpec,
    SimilarityRequest,
)

RED, BLUE = _png((200, 10, 10)), _png((10, 10, 200), (30, 60))


def _files(name: str, images: list[bytes]) -> list:
    return [(name, (f"{i}.png", b, "image/png")) for i, b in enumerate(images)]


def _form_only(fields: dict) -> tuple[bytes, dict]:
    """multipart/form-data with text fields only (httpx would send them urlencoded)."""
    parts = [(k, v) for k, vs in fields.items() for v in (vs if isinstance(vs, list) else [vs])]
    body = b"".join(f'--b0\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
                    for k, v in parts) + b"--b0--\r\n"
    return body, {"content-type": "multipart/form-data; boundary=b0"}


def _post_form(client, path: str, files: list, data: dict):
    if files:
        return client.post(path, files=files, data=data)
    body, headers = _form_only(data)
    return client.post(path, content=body, headers=headers)


def _ok(r) -> dict:
    assert r.status_code == 200, r.text
    return r.json()


def _same(a, b) -> None:
    """The same answer up to float rounding. Two requests can meet the model in different
    batches (one stream or two, a batch of one image or of two), and a batch's size moves
    results in their last bits; a wrong image, text or label moves them far more."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            if k == "embedding" and isinstance(a[k], str):  # encoding=base64: float32 bytes
                a_, b_ = (np.frombuffer(base64.b64decode(x), "<f4") for x in (a[k], b[k]))
                np.testing.assert_allclose(a_, b_, rtol=1e-5, atol=1e-6)
            else:
                _same(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _same(x, y)
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    else:
        assert a == b


def test_embed_multipart_equals_json(client):
    as_json = _ok(client.post("/embed", json={
        "texts": ["a cat", "a dog"], "images": [_b64(RED), _b64(BLUE)],
        "normalize": False, "encoding": "base64"}))
    as_form = _ok(client.post(
        "/embed", files=_files("images", [RED, BLUE]),
        data={"texts": ["a cat", "a dog"], "normalize": "false", "encoding": "base64"}))
    _same(as_form, as_json)


def test_embed_multipart_mixes_files_and_base64_fields(client):
    as_json = _ok(client.post("/embed", json={"images": [_b64(BLUE), _b64(RED)]}))
    # httpx sends the data fields first, so BLUE is part 0
    as_form = _ok(client.post("/embed", files=_files("images", [RED]),
                              data={"images": "data:image/png;base64," + _b64(BLUE)}))
    _same(as_form, as_json)


def test_classify_multipart_equals_json(client):
    labels = ["red", "green", "blue"]
    as_json = _ok(client.post("/classify", json={
        "images": [_b64(RED), _b64(BLUE)], "labels": labels, "templates": ["a {} thing"],
        "top_k": 2}))
    as_form = _ok(client.post("/classify", files=_files("images", [RED, BLUE]), data={
        "labels": labels, "templates": ["a {} thing"], "top_k": "2", "model": "tiny"}))
    _same(as_form, as_json)
    assert len(as_form["results"][0]["labels"]) == 2


def test_similarity_multipart_equals_json(client):
    as_json = _ok(client.post("/similarity", json={
        "queries": {"images": [_b64(RED), _b64(BLUE)]},
        "candidates": {"texts": ["red", "blue", "a dog"]}}))
    as_form = _ok(client.post("/similarity", files=_files("query_images", [RED, BLUE]),
                              data={"candidate_texts": ["red", "blue", "a dog"]}))
    _same(as_form, as_json)
    images_both_sides = _ok(client.post(
        "/similarity",
        files=_files("query_images", [RED]) + _files("candidate_images", [RED, BLUE])))
    assert len(images_both_sides["cosine"][0]) == 2
    assert images_both_sides["cosine"][0][0] == pytest.approx(1, abs=1e-5)


@pytest.mark.parametrize("path", ["/embed", "/classify", "/similarity"])
def test_other_content_types_are_415(client, path):
    for headers in ({"content-type": "text/plain"}, {}):
        r = client.post(path, content=b'{"texts": ["a"]}', headers=headers)
        assert r.status_code == 415, r.text
        assert r.json()["error"]["type"] == "unsupported_media_type"


def test_a_part_that_is_not_an_image_is_400(client):
    r = client.post("/embed", files=[("images", ("a.txt", b"hello there", "text/plain"))])
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_image"
    # An empty file is an empty input: 422, as an empty text or an empty list is.
    r = client.post("/embed", files=[("images", ("e.png", b"", "image/png"))])
    assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_request"


@pytest.mark.parametrize(
    ("path", "files", "data"),
    [
        ("/embed", [], {"normalize": "true"}),  # neither texts nor images
        ("/classify", _files("images", [RED]), {}),  # no labels
        ("/classify", [], {"labels": ["a"]}),  # no images
        ("/similarity", _files("query_images", [RED]), {"model": "tiny"}),  # no candidates
        ("/embed", [], {"texts": ["a"], "surprise": "1"}),
        ("/embed", [], {"texts": ["a"], "normalize": "maybe"}),
    ],
)
def test_missing_or_invalid_fields_are_422(client, path, files, data):
    r = _post_form(client, path, files, data)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["type"] == "invalid_request"


def test_text_only_forms_work(client):
    as_json = _ok(client.post("/embed", json={"texts": ["a", "b"], "truncate": False}))
    _same(_ok(_post_form(client, "/embed", [], {"texts": ["a", "b"], "truncate": "0"})), as_json)


def test_errors_read_the_same_in_both_encodings(client):
    as_json = client.post("/classify", json={"images": [_b64(RED)]}).json()
    as_form = client.post("/classify", files=_files("images", [RED])).json()
    assert as_form == as_json and "labels" in as_json["error"]["message"]


def test_a_file_in_a_text_field_and_repeated_scalars_are_400(client):
    r = client.post("/embed", files=[("texts", ("t.txt", b"a cat", "text/plain"))])
    assert r.status_code == 400
    r = client.post("/embed", data={"texts": "a", "normalize": ["true", "false"]},
                    files=_files("images", [RED]))
    assert r.status_code == 400


def test_openapi_documents_both_content_types(client):
    spec = client.get("/openapi.json").json()
    for path, required in [("/embed", None), ("/classify", ["images", "labels"]),
                           ("/similarity", None)]:
        content = spec["paths"][path]["post"]["requestBody"]["content"]
        assert content["application/json"]["schema"]["$ref"].startswith("#/components/")
        form = content["multipart/form-data"]["schema"]
        assert form.get("required") == required
        images = "query_images" if path == "/similarity" else "images"
        assert form["properties"][images]["items"]["format"] == "binary"


# Bodies that between them set every field of each endpoint's request model (similarity
# takes one modality a side, so it needs two).
_FULL_BODIES = {
    "/embed": (EmbedRequest, EMBED_FORM, [
        {"model": "tiny", "texts": ["a cat", "a dog"], "images": [_b64(RED), _b64(BLUE)],
         "normalize": False, "encoding": "base64", "truncate": False},
    ]),
    "/classify": (ClassifyRequest, CLASSIFY_FORM, [
        {"model": "tiny", "images": [_b64(RED), _b64(BLUE)], "labels": ["red", "blue", "dog"],
         "templates": ["a {} thing", "a photo of a {}"], "top_k": 2},
    ]),
    "/similarity": (SimilarityRequest, SIMILARITY_FORM, [
        {"model": "tiny", "queries": {"images": [_b64(RED)]},
         "candidates": {"texts": ["red", "blue"]}},
        {"queries": {"texts": ["red", "blue"]}, "candidates": {"images": [_b64(BLUE), _b64(RED)]}},
    ]),
}


def _leaves(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Dotted paths of a request model's fields, nested models' fields included."""
    out = set()
    for name, info in model.model_fields.items():
        sub = info.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            out |= _leaves(sub, f"{prefix}{name}.")
        else:
            out.add(prefix + name)
    return out


def _at(body: dict, path: str):
    for key in path.split("."):
        if key not in body:
            return None
        body = body[key]
    return body


def _as_form(form: FormSpec, body: dict) -> tuple[list, dict]:
    """The JSON body as multipart: images as file parts, everything else as text fields."""
    files, data = [], {}
    for name, field in form.fields.items():
        value = _at(body, field.path)
        if value is None:
            continue
        if field.image:
            files += _files(name, [base64.b64decode(v) for v in value])
        elif isinstance(value, bool):
            data[name] = str(value).lower()
        else:
            data[name] = [str(v) for v in value] if field.many else str(value)
    return files, data


@pytest.mark.parametrize("path", sorted(_FULL_BODIES))
def test_every_json_field_is_a_form_field(client, path):
    model, form, bodies = _FULL_BODIES[path]
    # The bodies set every field the model has; a new field must be added to them.
    assert {p for b in bodies for p in _leaves(model) if _at(b, p) is not None} == _leaves(model)
    assert {f.path for f in form.fields.values()} == _leaves(model)
    for body in bodies:
        files, data = _as_form(form, body)
        _same(_ok(_post_form(client, path, files, data)), _ok(client.post(path, json=body)))


def test_a_new_model_field_is_a_form_field():
    class Extended(EmbedRequest):
        dimensions: int | None = None
        tags: list[str] = Field(default_factory=list)

    form = FormSpec.of(Extended)
    assert form.fields["dimensions"] == FormField("dimensions", type="integer")
    assert form.fields["tags"] == FormField("tags", many=True)
    assert form.fields["images"] == FormField("images", many=True, image=True)
    assert form.fields.keys() - EMBED_FORM.fields.keys() == {"dimensions", "tags"}
    with pytest.raises(TypeError, match="prefix"):
        FormSpec.of(SimilarityRequest)  # query_texts or queries_texts: the spec must say


def test_a_non_ascii_text_field_reads_as_in_json(client):
    texts = ["café ☕", "東京の猫"]
    as_json = _ok(client.post("/embed", json={"texts": texts}))
    as_form = _ok(_post_form(client, "/embed", [], {"texts": texts}))
    _same(as_form, as_json)


def test_a_file_part_without_a_content_type_is_an_image(client):
    body = (b'--b0\r\nContent-Disposition: form-data; name="images"; filename="r"\r\n\r\n'
            + RED + b"\r\n--b0--\r\n")
    as_form = _ok(client.post("/embed", content=body,
                              headers={"content-type": "multipart/form-data; boundary=b0"}))
    _same(as_form, _ok(client.post("/embed", json={"images": [_b64(RED)]})))


@pytest.mark.parametrize(("body", "content_type"), [
    (b"not a form", "multipart/form-data; boundary=b0"),
    (b"--b0\r\n\r\nno name\r\n--b0--\r\n", "multipart/form-data; boundary=b0"),
    (b"--b0--\r\n", "multipart/form-data"),
])
def test_a_malformed_form_is_400(client, body, content_type):
    r = client.post("/embed", content=body, headers={"content-type": content_type})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"].startswith("multipart body: ")

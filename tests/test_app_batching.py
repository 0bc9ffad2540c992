"""The app batches concurrent users: their requests share one CNN pass and one search, and each still gets what
it would have got alone."""
from __future__ import annotations

import pytest

from captioner import Captioner
from captioner import webapp
from captioner.webapp import MAX_BATCH, build_app, caption_requests, caption_uploads


@pytest.fixture(scope="module")
def captioner(trained):
    return Captioner.from_checkpoint(trained[1] / "best.pt")


def test_requests_captioned_together_get_what_each_gets_alone(captioner, tiny_flickr8k, tmp_path, monkeypatch):
    images = sorted(str(p) for p in (tiny_flickr8k / "images").glob("*.jpg"))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 cut short")
    requests = [([images[0], images[1]], "beam", 2, 12, 0.0, 2, 1),
                ([images[2]], "beam", 2, 12, 0.0, 2, 2),  # other options (2 best): its own group
                ([images[3], str(broken)], "beam", 2, 12, 0.0, 2, 1),  # same options as the first: together
                ([], "beam", 2, 12, 0.0, 2, 1),  # no files: an error row, the others unaffected
                ([images[4]], "greedy", 5, 12, 0.0, 2, 3)]
    alone = [caption_uploads(captioner, *request) if request[0] else None for request in requests]
    calls = []
    original = webapp.caption_files
    monkeypatch.setattr(webapp, "caption_files", lambda model, paths, **options: calls.append(list(paths))
                        or original(model, paths, **options))
    galleries, tables = caption_requests(captioner, *map(list, zip(*requests)))
    assert len(calls) == 3 and calls[0] == [images[0], images[1], images[3], str(broken)]
    for index, expected in enumerate(alone):
        if expected is None:
            assert galleries[index] == [] and "Upload at least one image" in tables[index][0][-1]
        else:
            assert (galleries[index], tables[index]) == expected, index


def test_app_batches_the_caption_endpoint(captioner):
    app = build_app(captioner)
    caption = next(f for f in app.fns.values() if f.api_name == "caption")
    assert caption.batch and caption.max_batch_size == MAX_BATCH and caption.concurrency_limit == 1

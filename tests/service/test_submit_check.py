"""``app.submissions.submit_check``, the service function behind ``POST /authenticate``, called
directly as any in-process front end would: no HTTP request, the gateway's own services
(embedded storage and broker in a temporary folder, the tiny registry)."""

from __future__ import annotations

import pytest

from app.auth import Caller
from app.errors import ApiError
from app.submissions import SubmittedFile, submit_check
from cgidm.jobs import JobSettings
from cgidm_testkit.processes import png_bytes

LOCAL = Caller(name=None)


def _image(index: int, name: str = "a.png", field: str = "images") -> SubmittedFile:
    return SubmittedFile(field=field, index=index, filename=name, data=png_bytes(index + 1))


def test_a_check_is_stored_and_queued(app_client):
    services = app_client.app.state.services
    settings = JobSettings(pretrained="tiny-base", finetuned="tiny-ft", steps=4)
    accepted = submit_check(services, LOCAL, settings, [_image(0), _image(1, "b.png")],
                            [_image(0, "c.png", "controls")])
    assert accepted.status_url == f"/jobs/{accepted.job_id}"
    record = services.store.load(accepted.job_id)
    assert [(f.name, f.role) for f in record.inputs] == [("a", "image"), ("b", "image"),
                                                          ("c", "control")]
    assert record.settings.steps == 4 and record.queue_key == "tiny-ft"
    assert accepted.job_id in services.store.recent_job_ids(None, 10)


@pytest.mark.parametrize(("fields", "loc", "kind"), [
    ({"finetuned": "no-such-model"}, ["body", "finetuned"], "unknown_model"),
    ({"finetuned": "hf:someone/model"}, ["body", "finetuned"], "remote_model_not_allowed"),
])
def test_a_refused_check_stores_nothing(app_client, fields, loc, kind):
    services = app_client.app.state.services
    before = services.store.recent_job_ids(None, 1000)
    settings = JobSettings(**{"pretrained": "tiny-base", "finetuned": "tiny-ft", **fields})
    with pytest.raises(ApiError) as refused:
        submit_check(services, LOCAL, settings, [_image(0)])
    assert (refused.value.loc, refused.value.kind) == (loc, kind)
    assert services.store.recent_job_ids(None, 1000) == before


def test_a_file_that_is_no_image_is_refused_before_anything_is_stored(app_client):
    services = app_client.app.state.services
    before = services.store.recent_job_ids(None, 1000)
    settings = JobSettings(pretrained="tiny-base", finetuned="tiny-ft")
    bad = SubmittedFile(field="controls", index=0, filename="c.gif", data=b"GIF89a garbage")
    with pytest.raises(ApiError) as refused:
        submit_check(services, LOCAL, settings, [_image(0)], [bad])
    assert (refused.value.loc, refused.value.kind) == (["body", "controls"], "not_an_image")
    assert services.store.recent_job_ids(None, 1000) == before

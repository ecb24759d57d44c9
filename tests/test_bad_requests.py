"""Bad requests get a clear error of their own; the server stays up and the next good request succeeds.

Each case is sent to the shared server (tests/serving_fixtures.py), through the ensemble or straight to the
model, and is followed by good requests through both.
"""

from __future__ import annotations

import concurrent.futures

import numpy as np
import pytest

from exporter.clients import common
from serving_fixtures import ENSEMBLE, MAX_BATCH_SIZE, MODEL, STREAM_ENSEMBLE, STREAM_MODEL

pytestmark = pytest.mark.triton

GOOD_IDS = [[464, 2068, 7586], [15496, 50256, 50256]]  # right-padded with end_id


def _changed(arrays, change):
    """`arrays` with each named input replaced, or removed where the change is None."""
    for name, value in change.items():
        if value is None:
            arrays.pop(name)
        else:
            arrays[name] = value
    return arrays


def ensemble_case(**change):
    return ENSEMBLE, _changed(common.ensemble_arrays(["Hello there"], 4), change)


def model_case(**change):
    arrays = {"input_ids": np.array(GOOD_IDS, dtype=np.uint32),
              "input_lengths": np.array([[3], [1]], dtype=np.uint32),
              "request_output_len": np.array([[4], [4]], dtype=np.uint32)}
    return MODEL, _changed(arrays, change)


def word_list(ids, offsets, rows=2):
    return np.repeat(np.array([[ids, offsets]], dtype=np.int32), rows, axis=0)


WRONG_DTYPE = "data-type is .INT32., but model .* expects .UINT32."  # Triton checks dtypes itself
CASES = {
    # through the ensemble (text in)
    "empty-prompt": (ensemble_case(INPUT_0=np.array([[b""]], dtype=object)), r"QUERY\[0\] is empty"),
    "prompt-not-utf8": (ensemble_case(INPUT_0=np.array([[b"\xff\xfe oops"]], dtype=object)), "not valid utf-8"),
    "output-beyond-max-pos": (ensemble_case(INPUT_1=np.array([[500]], dtype=np.uint32)), "max_pos_seq_len"),
    "output-len-zero": (ensemble_case(INPUT_1=np.array([[0]], dtype=np.uint32)), "request_output_len"),
    "top-p-above-1": (ensemble_case(runtime_top_p=np.array([[1.5]], dtype=np.float32)), "top_p"),
    "top-p-negative": (ensemble_case(runtime_top_p=np.array([[-0.1]], dtype=np.float32)), "top_p"),
    "beam-too-wide": (ensemble_case(beam_width=np.array([[99]], dtype=np.uint32)), "beam_width"),
    "batch-above-max": (ensemble_case(INPUT_0=np.array([[b"Hi"]] * (MAX_BATCH_SIZE + 1), dtype=object),
                                      INPUT_1=np.full((MAX_BATCH_SIZE + 1, 1), 4, dtype=np.uint32)),
                        "batch.size"),
    "wrong-dtype": (ensemble_case(INPUT_1=np.array([[4]], dtype=np.int32)), WRONG_DTYPE),
    "wrong-shape": (ensemble_case(runtime_top_k=np.array([[1, 2]], dtype=np.uint32)), "shape"),
    "bad-words-empty-word": (ensemble_case(INPUT_2=np.array([[b"good,,bad"]], dtype=object)),
                             "encodes to no tokens"),
    "stop-words-not-csv": (ensemble_case(INPUT_3=np.array([[b'"unterminated']], dtype=object)),
                           "not a comma-separated word list"),
    "words-not-utf8": (ensemble_case(INPUT_2=np.array([[b"\xc3\x28"]], dtype=object)), "not valid utf-8"),
    "words-wrong-batch": (ensemble_case(INPUT_2=np.array([[b"a"], [b"b"]], dtype=object)),
                          "batch size does not match"),
    # straight to the model (token ids in)
    # The ensemble's one required input is INPUT_0 (INPUT_1 is optional); the model still requires its length.
    "missing-required": (model_case(request_output_len=None), "request_output_len"),
    "input-length-zero": (model_case(input_lengths=np.array([[0], [1]], dtype=np.uint32)), "input_lengths"),
    "input-length-beyond-ids": (model_case(input_lengths=np.array([[3], [9]], dtype=np.uint32)), "input_lengths"),
    "negative-length-as-uint32": (model_case(request_output_len=np.array([[4], [2**32 - 1]], dtype=np.uint32)),
                                  "max_pos_seq_len"),
    "negative-length-int32": (model_case(request_output_len=np.array([[4], [-1]], dtype=np.int32)), WRONG_DTYPE),
    "ids-outside-vocab": (model_case(input_ids=np.array([[464, 99999, 1], [1, 2, 3]], dtype=np.uint32)),
                          "input_ids"),
    "word-offsets-decrease": (model_case(bad_words_list=word_list([464, 2068, 0], [2, 1, -1])), "bad_words_list"),
    "word-id-outside-vocab": (model_case(stop_words_list=word_list([70000, -1], [1, -1])), "stop_words_list"),
    "word-list-wrong-rows": (model_case(bad_words_list=np.zeros((2, 3, 2), dtype=np.int32)), "shape"),
    "model-batch-above-max": (model_case(input_ids=np.ones((MAX_BATCH_SIZE + 1, 3), dtype=np.uint32),
                                         input_lengths=np.full((MAX_BATCH_SIZE + 1, 1), 3, dtype=np.uint32),
                                         request_output_len=np.full((MAX_BATCH_SIZE + 1, 1), 4, dtype=np.uint32)),
                              "batch.size"),
}


def assert_good_requests_succeed(served):
    text = common.infer(served.http_url, "http", ENSEMBLE, common.ensemble_arrays(["Hello there"], 4))
    assert text["OUTPUT_0"].shape == (1, 1) and int(text["sequence_length"][0, 0]) == 2 + 4
    model, arrays = model_case()
    ids = common.infer(served.http_url, "http", model, arrays,
                       output_names=["output_ids", "sequence_length", "cum_log_probs", "output_log_probs"])
    assert ids["output_ids"].shape == (2, 1, 3 + 4)
    assert served.server.running


@pytest.mark.parametrize("case", list(CASES))
def test_bad_request_fails_alone_and_server_stays_up(served, case):
    (model, arrays), message = CASES[case]
    with pytest.raises(common.ClientError, match=message) as error:
        common.infer(served.http_url, "http", model, arrays)
    assert model in str(error.value)
    assert_good_requests_succeed(served)


def test_bad_request_inside_a_dynamic_batch_fails_alone(served):
    """A bad request queued together with good ones (one execute()) fails; the good ones get their answers."""
    bad_model, bad = CASES["top-p-above-1"][0]
    alone = common.infer(served.http_url, "http", ENSEMBLE, common.ensemble_arrays(["Hello there"], 4))

    def send(arrays):
        try:
            return common.infer(served.http_url, "http", ENSEMBLE, arrays)
        except common.ClientError as error:
            return error

    requests = [bad, common.ensemble_arrays(["Hello there"], 4), bad, common.ensemble_arrays(["Hello there"], 4)]
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(send, requests))
    for index, result in enumerate(results):
        if index % 2 == 0:
            assert isinstance(result, common.ClientError) and "top_p" in str(result)
        else:
            assert result["OUTPUT_0"].tolist() == alone["OUTPUT_0"].tolist()


def test_bad_streaming_request_gets_an_error_on_its_stream(served):
    arrays = common.ensemble_arrays(["Hello there"], 4, top_p=2.0)
    with pytest.raises(common.ClientError, match="top_p"):
        common.stream(served.grpc_url, STREAM_ENSEMBLE, arrays, output_names=["OUTPUT_0"], timeout_s=60)
    good = common.stream(served.grpc_url, STREAM_ENSEMBLE, common.ensemble_arrays(["Hello there"], 4),
                         output_names=["OUTPUT_0"], timeout_s=60)
    assert len(good) == 4 + 1 and good[-1].final
    assert_good_requests_succeed(served)


def test_stream_cancelled_by_its_client_leaves_the_batch_and_server_unharmed(served):
    """A client that cancels its stream mid-generation must not fail the stream batched with it.

    Cancelled straight at the decoupled model: the model sees the cancellation and closes that stream. (Through the
    streaming ensemble, tritonserver 2.51 does not pass a cancellation on to the model and keeps counting the
    cancelled ensemble request as in flight, so a later graceful shutdown waits out its exit timeout.)
    """
    import queue
    import threading
    import time

    import tritonclient.grpc as grpc

    other_arrays = common.ensemble_arrays(["Hello there"], 12)
    expected = common.infer(served.http_url, "http", ENSEMBLE, other_arrays)["OUTPUT_0"].tolist()
    long_request = {"input_ids": np.array([GOOD_IDS[0]], dtype=np.uint32),
                    "input_lengths": np.array([[3]], dtype=np.uint32),
                    "request_output_len": np.array([[100]], dtype=np.uint32)}
    responses: queue.Queue = queue.Queue()
    leaving = grpc.InferenceServerClient(served.grpc_url)
    leaving.start_stream(callback=lambda result, error: responses.put((result, error)))
    other: dict = {}
    thread = threading.Thread(target=lambda: other.update(result=common.stream(
        served.grpc_url, STREAM_ENSEMBLE, other_arrays, output_names=["OUTPUT_0"], timeout_s=120)))
    leaving.async_stream_infer(STREAM_MODEL, [common.tensor("grpc", name, array)
                                              for name, array in long_request.items()])
    thread.start()
    result, error = responses.get(timeout=120)  # generation has started ...
    assert error is None and result.as_numpy("output_ids").shape[:2] == (1, 1)
    leaving.stop_stream(cancel_requests=True)  # ... and its client goes away
    leaving.close()
    thread.join(180)
    assert other["result"][-1]["OUTPUT_0"].tolist() == expected
    deadline = time.monotonic() + 60
    while "cancelled by its client" not in served.server.log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "cancelled by its client" in served.server.log_path.read_text()
    assert_good_requests_succeed(served)

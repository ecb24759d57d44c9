"""In-flight batching for the python runtime's Triton models (model.py for GPT, model_t5.py for T5): one scheduler
thread drives an ft_generate.Engine and answers every request through its response sender.

submit() answers a bad request with its error at once and queues the others; an idle thread first waits a short
admission window for more (_gather: requests sent together share one prefill); the thread admits them between decoding
steps while the running rows stay within max_batch_size (one request alone may be larger), the prompts of those
admitted together prefilled in joint forwards, steps every running request, answers each as it finishes (its cache
freed at once) and stops one its client cancelled before the next step. Plain models get exactly one response per
request, flagged TRITONSERVER_RESPONSE_COMPLETE_FINAL; decoupled ones a response after each step that grew one of
the request's sequences, then the final one. A cancelled request's stream is closed with a flags-only final (a plain
request: an error response).

What differs between models is the host's (the TritonPythonModel):
  host.parse(request) -> batch            a checked batch (raises with the message of a bad request)
  host.rows(batch) -> int                 rows the batch decodes (for max_batch_size)
  host.prompt_tokens(batch) -> int        for the metrics
  host.admit(engine, batch, stream) -> cohort   engine.admit (prefilled with the requests admitted with it);
                                          stream(partial) gets the host's layout after each step
  host.final(cohort, batch) -> (response, generated tokens)   a finished cohort's answer
  host.partial(output, batch) -> response              a streamed step's answer
Self-contained (a template copied into the model directory): stdlib and torch; pb_utils and the metrics
(ft_metrics.Metrics) are passed in.
"""

import queue
import threading
import time

import torch


def log(pb_utils, message):
    logger = getattr(pb_utils, "Logger", None)
    if logger is not None:
        logger.log_info(message)
    else:
        print(message, flush=True)


def client_cancelled(request):
    """Whether the client cancelled the request (python backend >= 23.10; False where unknown)."""
    is_cancelled = getattr(request, "is_cancelled", None)
    return bool(is_cancelled()) if callable(is_cancelled) else False


# An idle engine waits this long for the next arrival before prefilling, unless the model's config.pbtxt says otherwise
# (parameter admission_window_microseconds; benchmarks/serving.py).
ADMISSION_WINDOW_US = 5000
# An idle engine's admission window lasts at most this many times the configured gap between arrivals (_gather).
WINDOWS = 4


class _Work:
    """One request inside the model: its parsed batch, its decoding (cohort) once admitted, its stream's state."""

    def __init__(self, request, sender, batch, started):
        self.request, self.sender, self.batch, self.started = request, sender, batch, started
        self.cohort = None
        self.answered = False  # got its first response (time to first token)
        self.last = None       # sequence lengths of its latest streamed response
        self.gone = False      # its stream failed or its client cancelled: stop at the next step


class Scheduler:
    """The scheduler thread of one model instance over `engine` (an ft_generate.Engine)."""

    def __init__(self, host, engine, pb_utils, metrics, max_rows, decoupled, name, window=0.0):
        self.host, self.engine, self.pb_utils, self.metrics = host, engine, pb_utils, metrics
        self.max_rows, self.decoupled, self.name = max_rows, decoupled, name
        self.window = max(0.0, float(window))  # seconds an idle engine waits for the next arrival (_gather)
        self._incoming, self._running, self._stopping = queue.Queue(), {}, False
        self._lock = threading.Lock()  # the metrics, updated by submit() and the scheduler
        self._thread = threading.Thread(target=self._serve, name=f"{name} scheduler", daemon=True)
        self._thread.start()

    def error(self, message):
        return self.pb_utils.InferenceResponse(output_tensors=[], error=self.pb_utils.TritonError(message))

    def submit(self, requests):
        """Queue each valid request for the scheduler and answer each bad one with an error at once."""
        started = time.monotonic()
        with self._lock:
            self.metrics.started(len(requests))
        for request in requests:
            sender = request.get_response_sender()
            try:
                batch = self.host.parse(request)
            except Exception as exc:  # noqa: BLE001 - a bad request fails alone
                self._close(_Work(request, sender, None, started), self.error(f"bad request: {exc}"), failed=True)
                continue
            self._incoming.put(_Work(request, sender, batch, started))

    def stop(self):
        """Stop the thread; requests still running or waiting get an error."""
        self._stopping = True
        self._incoming.put(None)  # wakes a scheduler waiting for work
        self._thread.join()

    def _serve(self):
        """Admit waiting requests between steps, step every running one, answer those that leave, until stop()."""
        waiting = []
        while True:
            waiting += self._take(block=not waiting and not self._running)
            if waiting and not self._running:
                waiting = self._gather(waiting)
            if self._stopping:
                break
            try:
                waiting = self._admit(waiting)
                self._drop_cancelled()
                for cohort in self.engine.step():
                    work = self._running.pop(id(cohort))
                    if cohort.error is not None:
                        self._close(work, self.error(f"generation failed: {type(cohort.error).__name__}: "
                                                     f"{cohort.error}"), failed=True)
                    else:
                        response, generated = self.host.final(cohort, work.batch)
                        self._close(work, response, generated=generated)
            except Exception as exc:  # noqa: BLE001 - a scheduler bug answers every running request, never hangs it
                log(self.pb_utils, f"{self.name}: the scheduler failed: {type(exc).__name__}: {exc}")
                for cohort in list(self.engine.cohorts):
                    self.engine.cancel(cohort)
                for work in self._running.values():
                    self._close(work, self.error(f"generation failed: {type(exc).__name__}: {exc}"), failed=True)
                self._running.clear()
        for work in waiting + list(self._running.values()) + self._take(block=False):
            self._close(work, self.error("the model is being unloaded"), failed=True)
        self._running.clear()

    def _take(self, block):
        """The requests queued by submit() (waiting for one when `block`); stop() wakes a blocked call."""
        taken = []
        try:
            item = self._incoming.get(block=block)
            while True:
                if item is not None:
                    taken.append(item)
                item = self._incoming.get_nowait()
        except queue.Empty:
            pass
        return taken

    def _gather(self, waiting):
        """An idle engine's admission window: before prefilling, keep taking requests while each arrives within
        `window` of the one before (at most WINDOWS x window in all, or until max_batch_size rows wait), so that
        requests sent together (clients answered in the same step, a burst) share one prefill and decode in step
        from the first token, instead of the first one's prefill and steps delaying the others'. A request that
        comes alone waits `window` once; a busy engine never waits (its arrivals join at the next step)."""
        if not self.window:
            return waiting
        deadline = time.monotonic() + WINDOWS * self.window
        while not self._stopping:
            rows = sum(self.host.rows(work.batch) for work in waiting)
            timeout = min(self.window, deadline - time.monotonic())
            if (self.max_rows and rows >= self.max_rows) or timeout <= 0:
                break
            try:
                item = self._incoming.get(timeout=timeout)
            except queue.Empty:
                break
            if item is not None:  # None: stop() woke us
                waiting.append(item)
        return waiting

    def _admit(self, waiting):
        """Prefill the waiting requests in arrival order while the running rows stay within max_batch_size
        (one request alone may be larger), those admitted together in joint forwards (Engine.joint_prefill);
        returns those still waiting."""
        with self.engine.joint_prefill():
            return self._admit_each(waiting)

    def _admit_each(self, waiting):
        while waiting:
            work = waiting[0]
            rows = self.host.rows(work.batch)
            running = sum(self.host.rows(item.batch) for item in self._running.values())
            if running and self.max_rows and running + rows > self.max_rows:
                break
            waiting.pop(0)
            if client_cancelled(work.request):
                self._close(work, None, cancelled=True)
                continue
            stream = self._streamer(work) if self.decoupled else None
            try:
                cohort = self.host.admit(self.engine, work.batch, stream)
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory: this request fails alone
                self._close(work, self.error(f"generation failed: {type(exc).__name__}: {exc}"), failed=True)
                continue
            self._running[id(cohort)] = work
            work.cohort = cohort
            with self._lock:
                self.metrics.batch(running + rows, self.host.prompt_tokens(work.batch))
        return waiting

    def _drop_cancelled(self):
        """Stop the requests whose client cancelled them; their caches are freed now."""
        for key, work in list(self._running.items()):
            if work.gone or client_cancelled(work.request):
                self.engine.cancel(work.cohort)
                del self._running[key]
                self._close(work, None, cancelled=True)

    def _close(self, work, response, failed=False, cancelled=False, generated=0):
        """Send a request's final response and count it (ft_metrics). A cancelled request: a flags-only final on a
        stream, an error response on a plain model (which must send exactly one response)."""
        final = self.pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        if cancelled or (not failed and client_cancelled(work.request)):
            log(self.pb_utils, f"{self.name}: a request was cancelled by its client; it is stopped and closed")
            response = None if self.decoupled else self.error("the request was cancelled by its client")
        with self._lock:  # counted before the final goes out: a client that scrapes on receiving it sees its request
            if not work.answered:
                self.metrics.first_response(time.monotonic() - work.started)
            self.metrics.finished(1, int(failed), generated)
        self._send(work.sender, response, flags=final)

    def _send(self, sender, response, flags=0):
        """Send through a request's response sender (response None: flags only); False (logged) when that fails."""
        try:
            if response is None:
                sender.send(flags=flags)
            else:
                sender.send(response, flags=flags)
        except Exception as exc:  # noqa: BLE001 - one lost stream must not fail the rest of the batch
            log(self.pb_utils, f"{self.name}: could not send a response: {type(exc).__name__}: {exc}")
            return False
        return True

    def _streamer(self, work):
        """The stream callback of a decoupled request: a response after each step that grew its sequences."""

        def send(partial):
            lengths = partial.sequence_length
            if work.gone or (work.last is not None and torch.equal(lengths, work.last)):
                return  # gone, or finished: nothing new to say until the final response
            work.last = lengths.clone()
            if client_cancelled(work.request) or not self._send(work.sender, self.host.partial(partial, work.batch)):
                work.gone = True  # its client went away: stopped before the next step
            elif not work.answered:
                work.answered = True
                with self._lock:
                    self.metrics.first_response(time.monotonic() - work.started)

        return send


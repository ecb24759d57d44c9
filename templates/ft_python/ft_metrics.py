"""The python runtime's own Prometheus metrics, served by Triton beside its nv_* metrics on the metrics port
(`GET :8002/metrics`), through the python backend's `pb_utils.MetricFamily` (Triton >= 23.05).

Every metric has the labels model="<model name>" and version="<model version>". Counters only grow; a row is one
sequence of a request's batch (a request with input_ids [B, L] is B rows).

  ft_python_requests_total              counter   requests the model executed (bad requests included)
  ft_python_request_failures_total      counter   requests answered with an error (bad request or failed generation)
  ft_python_prompt_tokens_total         counter   prompt tokens of the generated rows (sum of input_lengths)
  ft_python_generated_tokens_total      counter   tokens generated, every returned beam counted (sum over rows and
                                                  beams of sequence_length - input_length)
  ft_python_requests_in_flight          gauge     requests the model is serving right now (queued or decoding)
  ft_python_batch_occupancy             gauge     rows decoding when a request is admitted / max_batch_size (0..1)
  ft_python_time_to_first_token_seconds histogram from the start of a request's execute() to its first response: the
                                                  first streamed token (decoupled) or the complete result (plain);
                                                  the time queued before execute() is Triton's
                                                  nv_inference_queue_duration_us. Where the python backend has no
                                                  HISTOGRAM kind, two counters: ..._seconds_sum and ..._seconds_count.

Stdlib only (a template copied into the repository); `pb_utils` is passed in. Without `MetricFamily` (an old
python backend) every method is a no-op.
"""

PREFIX = "ft_python_"
# Seconds: a tiny CPU model answers in milliseconds, a large one on a busy GPU in seconds.
TTFT_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]


class _Histogram:
    """A HISTOGRAM metric, or its sum and count as two counters where the backend lacks the kind."""

    def __init__(self, new_metric, family, name, description):
        if hasattr(family, "HISTOGRAM"):
            self._metric = new_metric(name, description, family.HISTOGRAM, buckets=TTFT_BUCKETS)
            self._sum = self._count = None
        else:
            self._metric = None
            self._sum = new_metric(name + "_sum", description + " (sum)", family.COUNTER)
            self._count = new_metric(name + "_count", description + " (count)", family.COUNTER)

    def observe(self, value):
        if self._metric is not None:
            self._metric.observe(value)
        else:
            self._sum.increment(value)
            self._count.increment(1)


class Metrics:
    """The metrics of one model instance (every instance of a model adds to the same series)."""

    def __init__(self, pb_utils, model_name, model_version, max_batch_size):
        self.enabled = hasattr(pb_utils, "MetricFamily")
        self.max_batch_size = max(1, int(max_batch_size))
        self._in_flight = 0
        # The families must outlive their metrics (the backend refuses to update a metric whose family is gone):
        # both are kept here, and close() drops the metrics first.
        self._families, self._metrics = [], []
        if not self.enabled:
            return
        labels = {"model": str(model_name), "version": str(model_version)}
        family = pb_utils.MetricFamily

        def new_metric(name, description, kind, **options):
            self._families.append(family(name=name, description=description, kind=kind))
            self._metrics.append(self._families[-1].Metric(labels=labels, **options))
            return self._metrics[-1]

        def metric(name, description, kind):
            return new_metric(PREFIX + name, description, kind)

        self.requests = metric("requests_total", "Requests the model executed", family.COUNTER)
        self.failures = metric("request_failures_total", "Requests answered with an error", family.COUNTER)
        self.prompt_tokens = metric("prompt_tokens_total", "Prompt tokens of the generated rows", family.COUNTER)
        self.generated_tokens = metric("generated_tokens_total", "Tokens generated, every returned beam counted",
                                       family.COUNTER)
        self.in_flight = metric("requests_in_flight", "Requests being executed", family.GAUGE)
        self.occupancy = metric("batch_occupancy", "Rows of the latest generation batch / max_batch_size",
                                family.GAUGE)
        self.time_to_first_token = _Histogram(
            new_metric, family, PREFIX + "time_to_first_token_seconds",
            "Seconds from the start of execute() to a request's first response")

    def close(self):
        """Drop the metrics, then their families (the model's finalize())."""
        self.enabled = False
        for name in ("requests", "failures", "prompt_tokens", "generated_tokens", "in_flight", "occupancy",
                     "time_to_first_token"):
            self.__dict__.pop(name, None)
        self._metrics.clear()
        self._families.clear()

    def started(self, requests):
        """execute() began with `requests` requests."""
        if self.enabled:
            self._in_flight += requests
            self.requests.increment(requests)
            self.in_flight.set(self._in_flight)

    def batch(self, rows, prompt_tokens):
        """A generation batch of `rows` rows holding `prompt_tokens` prompt tokens starts."""
        if self.enabled:
            self.occupancy.set(rows / self.max_batch_size)
            self.prompt_tokens.increment(prompt_tokens)

    def first_response(self, seconds):
        if self.enabled:
            self.time_to_first_token.observe(seconds)

    def finished(self, requests, failures, generated_tokens):
        """execute() ends: `failures` of its `requests` got an error; `generated_tokens` were generated."""
        if self.enabled:
            self._in_flight -= requests
            self.in_flight.set(self._in_flight)
            self.failures.increment(failures)
            self.generated_tokens.increment(generated_tokens)

"""Rewards scored by a server: an OpenAI-compatible judge (``openai_judge``) and a plain HTTP scorer (``http_reward``).

A judge served by vLLM, SGLang or TGI (or any OpenAI-compatible endpoint that returns log-probs) scores the way
:class:`~trl_visual.rewards.vlm_judge.VLMJudgeReward` does, ``P(yes) / (P(yes) + P(no))`` from the first
answer token's top log-probs, without holding the model in the training process. A scoring service of your own
(UnifiedReward, a GenEval detector, an ensemble) takes images as PNG or JPEG bytes and answers JSON scores.

Both are ``async`` callables: the trainer's reward caller (:class:`~trl_visual.trainer.reward_calls.RewardCaller`)
runs ``async`` rewards concurrently with each other on one event loop, within ``reward_timeout``. The HTTP
requests themselves run in a pool of ``max_concurrency`` threads (``urllib``, no extra dependency), each with
its own ``timeout``, retried with exponential backoff on connection errors and on HTTP 429/500/502/503/504.

An API key is read from the environment variable named by ``api_key_env`` when a request is made and sent as
``Authorization: Bearer …``; it is never an attribute, so it is not pickled, printed, logged or saved, and it is
masked out of any error text. From Python outside a trainer, ``reward.score(prompts, images)`` runs the
coroutine to its end.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import math
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from torch import Tensor

from trl_visual.rewards.judging import (
    DEFAULT_ANSWERS,
    DEFAULT_TEMPLATE,
    as_interpretations,
    break_chat_markers,
    check_answers,
    check_num_frames,
    check_templates,
    matches_answer,
    media_frames,
    questions_per_sample,
    to_uint8,
)
from trl_visual.rewards.registry import register_reward

logger = logging.getLogger(__name__)

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
"""Hosts a key may be sent to over plain ``http://``: the traffic never leaves the machine."""


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is answered as the ``HTTPError`` it is, never followed: urllib would send the request's headers,
    the ``Authorization`` key included, to whatever host the ``Location`` names."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> None:
        return None


_OPENER = urllib.request.build_opener(_RefuseRedirects)

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
"""HTTP statuses that a request is retried on: the server is busy or restarting, not refusing the request."""

IMAGE_FORMATS = ("png", "jpeg")
MAX_BACKOFF = 30.0
"""The longest wait between two tries, in seconds."""


class RemoteRewardError(RuntimeError):
    """A reward server could not be reached, or answered something that is not scores."""


def encode_image(frame: Tensor, image_format: str = "png", quality: int = 95) -> str:
    """One ``uint8`` ``(3, H, W)`` frame as base64 PNG (lossless) or JPEG (``quality``) bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    picture = Image.fromarray(frame.permute(1, 2, 0).numpy())
    if image_format == "jpeg":
        picture.save(buffer, format="JPEG", quality=quality)
    else:
        picture.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def backoff_delay(attempt: int, backoff: float) -> float:
    """The wait before try ``attempt + 1``: ``backoff · 2^attempt`` seconds, at most :data:`MAX_BACKOFF`."""
    return min(backoff * 2**attempt, MAX_BACKOFF)


class RemoteReward:
    """What the remote rewards share: where the server is, the key's environment variable, time-outs, retries,
    the concurrency limit, and the ``async`` call that sends a batch's requests and keeps their order.

    Subclasses say which requests a batch makes (:meth:`requests`) and how an answer becomes scores
    (:meth:`parse`), and pass these server settings through (``**server``).

    Args:
        url: the endpoint every request is posted to.
        api_key_env: the environment variable holding the API key (``None``: send none).
        timeout: seconds one request may take.
        max_retries: how many times a request is tried again after a connection error or HTTP 429/5xx.
        backoff: the first wait between tries, in seconds; it doubles each time (at most 30 s).
        max_concurrency: the most requests in flight at once.
        image_format: ``"png"`` (lossless) or ``"jpeg"``.
        num_frames: frames sent per video, evenly spaced.
        name: the metric name; the class's ``name`` by default.
    """

    name = "remote_reward"

    def __init__(
        self,
        url: str,
        /,
        *,
        api_key_env: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        max_concurrency: int = 8,
        image_format: str = "png",
        num_frames: int = 4,
        name: str | None = None,
    ) -> None:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"The reward server's URL must start with http:// or https://, got {url!r}.")
        if api_key_env is not None and url.startswith("http://"):
            host = urllib.parse.urlsplit(url).hostname
            if host not in LOOPBACK_HOSTS:
                logger.warning(
                    "%s sends the key of %s over plain http:// to %s: anyone on the network path can read it. "
                    "Use https://, or keep the server on a private network you trust.",
                    type(self).__name__,
                    api_key_env,
                    host,
                )
        if api_key_env is not None and not os.environ.get(api_key_env):
            raise ValueError(
                f"api_key_env={api_key_env!r}, but that environment variable is not set: `export {api_key_env}=...` "
                "before training (the key itself never goes in a config), or pass api_key_env=None for a server "
                "without a key."
            )
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}.")
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be a non-negative integer, got {max_retries!r}.")
        if not backoff >= 0:
            raise ValueError(f"backoff must be a non-negative number of seconds, got {backoff!r}.")
        if not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise ValueError(f"max_concurrency must be a positive integer, got {max_concurrency!r}.")
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}.")
        self.url = url
        self.api_key_env = api_key_env
        self.timeout, self.max_retries, self.backoff = timeout, max_retries, backoff
        self.max_concurrency, self.image_format = max_concurrency, image_format
        self.num_frames = check_num_frames(num_frames)
        self.name = name or type(self).name

    def __repr__(self) -> str:
        key = f", api_key_env={self.api_key_env!r}" if self.api_key_env else ""
        return f"{type(self).__name__}(url={self.url!r}{key}, name={self.name!r})"

    # -- the call ------------------------------------------------------------------------------------------------
    async def __call__(
        self,
        prompts: list[str],
        images: Tensor | None = None,
        *,
        videos: Tensor | None = None,
        **columns: Any,
    ) -> list[Any]:
        """The scores of a batch (one float per sample, or ``M`` per sample: interpretations), in order."""
        frames, media = media_frames(prompts, images, videos, self.num_frames, self.name)
        pictures = to_uint8(frames)
        loop = asyncio.get_running_loop()
        pool = ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix=f"reward-{self.name}")
        try:
            encoded = await asyncio.gather(
                *(loop.run_in_executor(pool, self.encode_sample, sample) for sample in pictures)
            )
            requests = self.requests(prompts, encoded, media, columns)
            answers = await asyncio.gather(
                *(loop.run_in_executor(pool, self.post, body) for body in requests)
            )
        finally:  # cancelled by reward_timeout: queued requests are dropped, running ones end at `timeout`
            pool.shutdown(wait=False, cancel_futures=True)
        return self.parse(answers, len(prompts))

    def score(self, prompts: list[str], images: Tensor | None = None, **kwargs: Any) -> list[Any]:
        """The scores from synchronous code (a script, a notebook without a running loop)."""
        return asyncio.run(self(prompts, images, **kwargs))

    def encode_sample(self, frames: Tensor) -> list[str]:
        """A sample's ``uint8`` frames ``(T, 3, H, W)`` as base64 image files."""
        return [encode_image(frame, self.image_format) for frame in frames]

    def requests(
        self, prompts: list[str], encoded: list[list[str]], media: str, columns: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """Hook: the JSON bodies a batch is sent as, in the order :meth:`parse` reads their answers."""
        raise NotImplementedError

    def parse(self, answers: list[Any], batch: int) -> list[Any]:
        """Hook: the batch's scores from the answers to :meth:`requests`."""
        raise NotImplementedError

    # -- one request, with retries -------------------------------------------------------------------------------
    def headers(self) -> dict[str, str]:
        """JSON headers, with ``Authorization: Bearer <key>`` read from ``api_key_env`` now (never stored)."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key_env:
            headers["Authorization"] = f"Bearer {os.environ.get(self.api_key_env, '')}"
        return headers

    def redact(self, text: str) -> str:
        """``text`` with the API key, if any, masked (a server may echo what it was sent)."""
        key = os.environ.get(self.api_key_env, "") if self.api_key_env else ""
        return text.replace(key, "<API key>") if len(key) >= 4 else text

    def post(self, body: dict[str, Any]) -> Any:
        """POST ``body`` as JSON to :attr:`url` and return the decoded JSON answer; a connection error or a
        retryable status is tried again after :func:`backoff_delay`, up to ``max_retries`` times.

        Raises:
            RemoteRewardError: the server cannot be reached, times out, refuses the request, or does not answer
                JSON; the message names the URL and never holds the key.
        """
        data = json.dumps(body).encode("utf-8")
        for attempt in range(self.max_retries + 1):
            last = attempt == self.max_retries
            request = urllib.request.Request(self.url, data=data, headers=self.headers(), method="POST")
            try:
                with _OPENER.open(request, timeout=self.timeout) as response:
                    raw = response.read()
                break
            except urllib.error.HTTPError as error:
                if error.code in RETRY_STATUSES and not last:
                    time.sleep(backoff_delay(attempt, self.backoff))
                    continue
                detail = " ".join(error.read()[:300].decode("utf-8", "replace").split())
                if 300 <= error.code < 400:
                    detail = (
                        f"it redirects to {error.headers.get('Location')!r}, which is not followed (the request "
                        "and its key stay with the URL given): give that URL instead"
                    )
                raise RemoteRewardError(
                    self.redact(
                        f"The reward server {self.url} answered HTTP {error.code} {error.reason} after "
                        f"{attempt + 1} tries: {detail or '(no body)'}. Check the URL, the model name and the key."
                    )
                ) from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as error:
                if not last:
                    time.sleep(backoff_delay(attempt, self.backoff))
                    continue
                reason = getattr(error, "reason", error)
                if isinstance(reason, TimeoutError) or isinstance(error, TimeoutError):
                    what = f"did not answer within timeout={self.timeout:g} s"
                else:
                    what = f"could not be reached ({type(reason).__name__}: {reason})"
                raise RemoteRewardError(
                    self.redact(
                        f"The reward server {self.url} {what} after {attempt + 1} tries. Is it running, and is "
                        "the URL right (base_url / url)? Raise timeout= or max_retries= for a slow server."
                    )
                ) from None
        try:
            return json.loads(raw)
        except ValueError:
            snippet = raw[:200].decode("utf-8", "replace")
            raise RemoteRewardError(
                self.redact(f"The reward server {self.url} did not answer JSON: {snippet!r}.")
            ) from None

    def malformed(self, answer: Any, expected: str) -> RemoteRewardError:
        """The error for an answer that is JSON but not what the protocol says."""
        text = json.dumps(answer)[:300] if not isinstance(answer, str) else answer[:300]
        return RemoteRewardError(
            self.redact(
                f"The reward server {self.url} answered {text}, not {expected}; is it the right endpoint?"
            )
        )


@register_reward("openai_judge")
class OpenAIJudgeReward(RemoteReward):
    """A vision-language judge behind an OpenAI-compatible chat endpoint (vLLM, SGLang, TGI, …), scored
    ``P(yes) / (P(yes) + P(no))`` from the log-probs of the answer's first token.

    Each question (a sample in one template, as :class:`~trl_visual.rewards.vlm_judge.VLMJudgeReward` asks it:
    ``{prompt}`` and ``{media}`` filled) is one ``POST {base_url}/chat/completions`` with the sample's frames as
    ``image_url`` data URLs, ``max_tokens=1``, ``temperature=0``, ``logprobs=true`` and ``top_logprobs``. Every
    returned token that is a spelling of an answer word (case and spaces ignored) adds its probability to that
    answer; a question whose top log-probs hold neither answer scores ``None`` (the sample is skipped), with a
    warning to raise ``top_logprobs`` or fix the template. Several templates (or a ``prompt_variants`` column)
    return several scores per sample: interpretations.

    Args:
        base_url: the API root, e.g. ``http://localhost:8000/v1`` for ``vllm serve``.
        model: the served model's name, as the server lists it at ``/v1/models``.
        templates: the question, or several (one interpretation each), with ``{prompt}`` and ``{media}``, as for
            :class:`~trl_visual.rewards.vlm_judge.VLMJudgeReward`.
        answers: the positive and the negative answer word.
        system_prompt: an optional system message before the question.
        top_logprobs: how many alternatives the server returns for the first token (vLLM allows 20 unless
            started with a larger ``--max-logprobs``).
        **server: the server settings of :class:`RemoteReward` (``api_key_env``, ``timeout``, ``max_retries``,
            ``backoff``, ``max_concurrency``, ``image_format``, ``num_frames``, ``name``).
    """

    name = "openai_judge"

    def __init__(
        self,
        base_url: str = "http://localhost:8000/v1",
        model: str = "Qwen/Qwen2.5-VL-7B-Instruct",
        *,
        templates: str | Sequence[str] = DEFAULT_TEMPLATE,
        answers: Sequence[str] = DEFAULT_ANSWERS,
        system_prompt: str | None = None,
        top_logprobs: int = 20,
        **server: Any,
    ) -> None:
        url = base_url.rstrip("/") + "/chat/completions" if isinstance(base_url, str) else base_url
        super().__init__(url, **server)
        if not isinstance(top_logprobs, int) or top_logprobs < 1:
            raise ValueError(f"top_logprobs must be a positive integer, got {top_logprobs!r}.")
        self.model, self.top_logprobs, self.system_prompt = model, top_logprobs, system_prompt
        self.templates = check_templates(templates)
        self.answers = check_answers(answers)
        self._warned = False

    def requests(
        self, prompts: list[str], encoded: list[list[str]], media: str, columns: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """One chat completion per question, sample-major."""
        mime = "image/png" if self.image_format == "png" else "image/jpeg"
        bodies = []
        for files, questions in zip(encoded, questions_per_sample(prompts, columns, self.templates, media)):
            pictures = [{"type": "image_url", "image_url": {"url": f"data:{mime};base64,{f}"}} for f in files]
            for question in questions:
                text = {"type": "text", "text": break_chat_markers(question)}
                messages = [{"role": "user", "content": [*pictures, text]}]
                if self.system_prompt is not None:
                    messages.insert(0, {"role": "system", "content": self.system_prompt})
                bodies.append(
                    {
                        "model": self.model,
                        "messages": messages,
                        "max_tokens": 1,
                        "temperature": 0.0,
                        "logprobs": True,
                        "top_logprobs": self.top_logprobs,
                    }
                )
        return bodies

    def parse(self, answers: list[Any], batch: int) -> list[Any]:
        """``P(yes) / (P(yes) + P(no))`` of each answer, as interpretations when a sample has several."""
        return as_interpretations([self.yes_share(answer) for answer in answers], batch)

    def yes_share(self, answer: Any) -> float | None:
        """``Σ_yes p / (Σ_yes p + Σ_no p)`` over the first token's top log-probs (``None``: neither answer)."""
        try:
            alternatives = answer["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
            pairs = [(str(entry["token"]), float(entry["logprob"])) for entry in alternatives]
        except (KeyError, IndexError, TypeError, ValueError):
            raise self.malformed(
                answer,
                "a chat completion with choices[0].logprobs.content[0].top_logprobs (ask with logprobs)",
            ) from None
        positive, negative = self.answers
        p_yes = sum(math.exp(lp) for token, lp in pairs if matches_answer(token, positive))
        p_no = sum(math.exp(lp) for token, lp in pairs if matches_answer(token, negative))
        if p_yes + p_no == 0.0:
            if not self._warned:
                self._warned = True
                logger.warning(
                    f"The judge at {self.url} put neither {positive!r} nor {negative!r} among its top "
                    f"{self.top_logprobs} first tokens; the sample is skipped. Ask for the answer word in the "
                    "template, or raise top_logprobs."
                )
            return None
        return p_yes / (p_yes + p_no)


@register_reward("http_reward")
class HTTPScoreReward(RemoteReward):
    """A scoring service of your own over plain HTTP: images go as PNG or JPEG bytes, scores come back as JSON.

    Each batch of at most ``batch_size`` samples is one ``POST {url}`` with the JSON body::

        {"prompts": [...], "images": [<base64 PNG>, ...], "image_format": "png", "media": "image",
         "model": <model or null>, "columns": {<JSON-serializable dataset columns>}}

    (for videos each entry of ``images`` is a list of ``num_frames`` base64 frames and ``media`` is ``"video"``),
    and the server answers ``{"scores": [...]}``: one number (or ``null`` to skip a sample) per sample, or a list
    of ``M`` numbers per sample (interpretations). Batches are sent concurrently (``max_concurrency``) and their
    scores put back in order.

    Args:
        url: the scoring endpoint, e.g. ``http://localhost:8000/score``.
        model: sent as ``"model"`` for a service that serves several.
        batch_size: the most samples per request.
        **server: the server settings of :class:`RemoteReward` (``api_key_env``, ``timeout``, ``max_retries``,
            ``backoff``, ``max_concurrency``, ``image_format``, ``num_frames``, ``name``).
    """

    name = "http_reward"

    def __init__(
        self,
        url: str = "http://localhost:8000/score",
        *,
        model: str | None = None,
        batch_size: int = 16,
        **server: Any,
    ) -> None:
        super().__init__(url, **server)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        self.model, self.batch_size = model, batch_size

    def requests(
        self, prompts: list[str], encoded: list[list[str]], media: str, columns: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """One request per ``batch_size`` samples."""
        shareable = {key: value for key, value in columns.items() if _is_json(value)}
        bodies = []
        for start in range(0, len(prompts), self.batch_size):
            part = slice(start, start + self.batch_size)
            files: list[Any] = encoded[part] if media == "video" else [f[0] for f in encoded[part]]
            bodies.append(
                {
                    "prompts": prompts[part],
                    "images": files,
                    "image_format": self.image_format,
                    "media": media,
                    "model": self.model,
                    "columns": {key: value[part] for key, value in shareable.items()},
                }
            )
        return bodies

    def parse(self, answers: list[Any], batch: int) -> list[Any]:
        """The ``scores`` of every answer, concatenated in order; each answer must hold one per sample sent."""
        scores: list[Any] = []
        for index, answer in enumerate(answers):
            expected = min(self.batch_size, batch - index * self.batch_size)
            values = answer.get("scores") if isinstance(answer, dict) else None
            if not isinstance(values, list) or len(values) != expected:
                raise self.malformed(
                    answer, f'{{"scores": [...]}} with {expected} entries (one per sample sent)'
                )
            scores.extend(values)
        return scores


def _is_json(value: Any) -> bool:
    """Whether a dataset column goes into a JSON body as it is (a list of plain values)."""
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return isinstance(value, list)


__all__: list[str] = [
    "HTTPScoreReward",
    "OpenAIJudgeReward",
    "RemoteReward",
    "RemoteRewardError",
    "encode_image",
]

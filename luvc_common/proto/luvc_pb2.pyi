from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Video(_message.Message):
    __slots__ = ("frames",)
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    frames: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, frames: _Optional[_Iterable[bytes]] = ...) -> None: ...

class Media(_message.Message):
    __slots__ = ("image", "video")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    VIDEO_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    video: Video
    def __init__(self, image: _Optional[bytes] = ..., video: _Optional[_Union[Video, _Mapping]] = ...) -> None: ...

class Grid(_message.Message):
    __slots__ = ("t", "h", "w")
    T_FIELD_NUMBER: _ClassVar[int]
    H_FIELD_NUMBER: _ClassVar[int]
    W_FIELD_NUMBER: _ClassVar[int]
    t: int
    h: int
    w: int
    def __init__(self, t: _Optional[int] = ..., h: _Optional[int] = ..., w: _Optional[int] = ...) -> None: ...

class MediaTokens(_message.Message):
    __slots__ = ("kind", "grid", "source_grid", "num_tokens", "cells")
    KIND_FIELD_NUMBER: _ClassVar[int]
    GRID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_GRID_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CELLS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    grid: Grid
    source_grid: Grid
    num_tokens: int
    cells: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, kind: _Optional[str] = ..., grid: _Optional[_Union[Grid, _Mapping]] = ..., source_grid: _Optional[_Union[Grid, _Mapping]] = ..., num_tokens: _Optional[int] = ..., cells: _Optional[_Iterable[int]] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("media", "method", "wire_dtype")
    MEDIA_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    media: _containers.RepeatedCompositeFieldContainer[Media]
    method: str
    wire_dtype: str
    def __init__(self, media: _Optional[_Iterable[_Union[Media, _Mapping]]] = ..., method: _Optional[str] = ..., wire_dtype: _Optional[str] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("tokens", "media", "vit_patches", "encode_ms", "model")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    MEDIA_FIELD_NUMBER: _ClassVar[int]
    VIT_PATCHES_FIELD_NUMBER: _ClassVar[int]
    ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    tokens: Tensor
    media: _containers.RepeatedCompositeFieldContainer[MediaTokens]
    vit_patches: int
    encode_ms: float
    model: str
    def __init__(self, tokens: _Optional[_Union[Tensor, _Mapping]] = ..., media: _Optional[_Iterable[_Union[MediaTokens, _Mapping]]] = ..., vit_patches: _Optional[int] = ..., encode_ms: _Optional[float] = ..., model: _Optional[str] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "media", "visual", "method", "max_new_tokens", "wire_dtype", "ignore_eos")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MEDIA_FIELD_NUMBER: _ClassVar[int]
    VISUAL_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    media: _containers.RepeatedCompositeFieldContainer[Media]
    visual: EncodeResponse
    method: str
    max_new_tokens: int
    wire_dtype: str
    ignore_eos: bool
    def __init__(self, prompt: _Optional[str] = ..., media: _Optional[_Iterable[_Union[Media, _Mapping]]] = ..., visual: _Optional[_Union[EncodeResponse, _Mapping]] = ..., method: _Optional[str] = ..., max_new_tokens: _Optional[int] = ..., wire_dtype: _Optional[str] = ..., ignore_eos: _Optional[bool] = ...) -> None: ...

class GenerateStats(_message.Message):
    __slots__ = ("request_id", "model", "method", "prompt_ids", "token_ids", "text", "vit_patches", "encoder_out", "llm_per_layer", "payload_bytes", "payload_bytes_uncompressed", "timings_ms")
    class TimingsMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    VIT_PATCHES_FIELD_NUMBER: _ClassVar[int]
    ENCODER_OUT_FIELD_NUMBER: _ClassVar[int]
    LLM_PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_UNCOMPRESSED_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_MS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    method: str
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    vit_patches: int
    encoder_out: int
    llm_per_layer: _containers.RepeatedScalarFieldContainer[int]
    payload_bytes: int
    payload_bytes_uncompressed: int
    timings_ms: _containers.ScalarMap[str, float]
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., method: _Optional[str] = ..., prompt_ids: _Optional[_Iterable[int]] = ..., token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., vit_patches: _Optional[int] = ..., encoder_out: _Optional[int] = ..., llm_per_layer: _Optional[_Iterable[int]] = ..., payload_bytes: _Optional[int] = ..., payload_bytes_uncompressed: _Optional[int] = ..., timings_ms: _Optional[_Mapping[str, float]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("text", "token_ids", "stats")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    stats: GenerateStats
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., stats: _Optional[_Union[GenerateStats, _Mapping]] = ...) -> None: ...

"""Which frame may come when: the one table of the conversation, per role (sans-IO, like the rest of wire/)."""

from __future__ import annotations

from enum import Enum

from ..errors import ProtocolError
from .frames import FrameType


class Role(Enum):
    SENDER = "sender"
    RECEIVER = "receiver"


class State(Enum):
    HANDSHAKE = "handshake"
    STREAMING = "streaming"
    FINISHING = "finishing"
    DONE = "done"
    CLOSED = "closed"


# Rule: every frame-order decision lives in this table. Key: the role *receiving* the frame, then its state.
# KEEPALIVE keeps the state; ABORT closes it from any state.
TRANSITIONS: dict[Role, dict[State, dict[FrameType, State]]] = {
    Role.RECEIVER: {  # frames that arrive from the sender
        State.HANDSHAKE: {FrameType.HELLO: State.STREAMING},
        State.STREAMING: {
            FrameType.PAGES: State.STREAMING,
            FrameType.PAGE_LIST: State.STREAMING,
            FrameType.PASS_END: State.STREAMING,
            FrameType.END: State.DONE,
        },
        State.DONE: {},
    },
    Role.SENDER: {  # frames that arrive from the receiver
        State.HANDSHAKE: {FrameType.WELCOME: State.STREAMING},
        State.STREAMING: {
            FrameType.RESUME_STATE: State.STREAMING,
            FrameType.HANDOFF: State.STREAMING,
            FrameType.PASS_LANDED: State.STREAMING,
            FrameType.RESULT: State.DONE,
        },
        State.DONE: {FrameType.HANDOFF_DONE: State.DONE},
    },
}


class Conversation:
    """Tracks one side's view of the incoming frame order and refuses anything out of place."""

    def __init__(self, role: Role) -> None:
        self.role = role
        self.state = State.HANDSHAKE

    def on_frame(self, frame_type: FrameType) -> None:
        if self.state is State.CLOSED:
            raise ProtocolError(f"{frame_type.name} frame after the peer aborted")
        if frame_type is FrameType.ABORT:
            self.state = State.CLOSED
            return
        if frame_type is FrameType.KEEPALIVE and self.state is not State.DONE:
            return
        allowed = TRANSITIONS[self.role].get(self.state, {})
        if frame_type not in allowed:
            raise ProtocolError(f"unexpected {frame_type.name} frame during {self.state.value}")
        self.state = allowed[frame_type]

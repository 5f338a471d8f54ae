"""%%name%%: a heartbeat on a timer, built with componentize-py.

Every tick publishes {"component": ..., "schedule": ..., "fired_at_ms": ...,
"missed": ...} to heartbeat/<component> at QoS 1, so whoever watches the
gateway sees it alive (and how many ticks it missed while it was down). A
heartbeat the host refuses to publish (not granted, or past the invocation's
publish budget) fails the tick without a retry.
"""

import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.exports import timer_handler
from wit_world.imports import mqtt_publisher, mqtt_types, types


class TimerHandler(exports.TimerHandler):
    def on_tick(self, ctx: types.Invocation, tick: timer_handler.Tick) -> None:
        beat = {
            "component": ctx.component,
            "schedule": tick.schedule,
            "fired_at_ms": tick.fired_at_ms,
            "missed": tick.missed,
        }
        print(f"{ctx.id} ({tick.schedule}): heartbeat, {tick.missed} missed")
        try:
            mqtt_publisher.publish(
                mqtt_types.Message(
                    topic=f"heartbeat/{ctx.component}",
                    payload=json.dumps(beat, separators=(",", ":")).encode(),
                    qos=mqtt_types.Qos.AT_LEAST_ONCE,
                    retain=False,
                    content_type="application/json",
                    response_topic=None,
                    correlation_data=None,
                    user_properties=[],
                )
            )
        except Err as e:
            raise Err(types.HandlerError_Reject(str(e.value.value)))

"""%%name%%: an MQTT thermostat, built with componentize-py.

Devices publish readings such as {"celsius": 18.5} to
devices/<id>/temperature. The handler decides whether the heating should run
and publishes the command to devices/<id>/heating at QoS 1:
{"on": true, "celsius": 18.5, "setpoint": 20.5}. A payload that is not such
a reading is rejected (dead-lettered at once, never retried), and so is a
command the host refuses to publish (not granted, or past this invocation's
publish budget: retrying would not change that).
"""

import json
import math

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import mqtt_publisher, mqtt_types, types

SETPOINT = 20.5
HYSTERESIS = 0.5


def reject(reason: str) -> Err:
    return Err(types.HandlerError_Reject(reason))


class MqttHandler(exports.MqttHandler):
    def handle_message(self, ctx: types.Invocation, msg: mqtt_types.Message) -> None:
        parts = msg.topic.split("/")
        if len(parts) != 3 or parts[0] != "devices" or parts[2] != "temperature":
            raise reject(f"unexpected topic {msg.topic}")
        try:
            celsius = json.loads(msg.payload)["celsius"]
        except (ValueError, KeyError, TypeError) as e:
            raise reject(f"not a reading: {e!r}")
        if isinstance(celsius, bool) or not isinstance(celsius, (int, float)) or not math.isfinite(celsius):
            raise reject("not a reading: no numeric celsius")

        on = celsius < SETPOINT - HYSTERESIS
        command = json.dumps({"on": on, "celsius": celsius, "setpoint": SETPOINT}, separators=(",", ":"), allow_nan=False)
        print(f"{ctx.id} attempt {ctx.attempt}: {msg.topic} {celsius} C -> heating {'on' if on else 'off'}")
        publish(
            mqtt_types.Message(
                topic=f"devices/{parts[1]}/heating",
                payload=command.encode(),
                qos=mqtt_types.Qos.AT_LEAST_ONCE,
                retain=False,
                content_type="application/json",
                response_topic=None,
                correlation_data=msg.correlation_data,
                user_properties=[],
            )
        )


def publish(msg: mqtt_types.Message) -> None:
    """Publishes; a refusal (denied, invalid topic, past the budget) rejects."""
    try:
        mqtt_publisher.publish(msg)
    except Err as e:
        raise reject(str(e.value.value))

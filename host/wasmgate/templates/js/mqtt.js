// %%name%%: an MQTT thermostat, built with ComponentizeJS.
//
// Devices publish readings such as {"celsius": 18.5} to
// devices/<id>/temperature. The handler decides whether the heating should
// run and publishes the command to devices/<id>/heating at QoS 1:
// {"on": true, "celsius": 18.5, "setpoint": 20.5}. A payload that is not such
// a reading is rejected (dead-lettered at once, never retried), and so is a
// command the host refuses to publish (not granted, or past this invocation's
// publish budget: retrying would not change that).
//
// A handler returns for success and throws a handler-error
// ({tag: "retry" | "reject", val: reason}) for failure.

import { publish } from "wasmgate:edge/mqtt-publisher@0.1.0";

const SETPOINT = 20.5;
const HYSTERESIS = 0.5;

export const mqttHandler = {
  handleMessage(ctx, msg) {
    const parts = msg.topic.split("/");
    if (parts.length !== 3 || parts[0] !== "devices" || parts[2] !== "temperature") {
      throw { tag: "reject", val: `unexpected topic ${msg.topic}` };
    }
    let celsius;
    try {
      celsius = JSON.parse(new TextDecoder().decode(msg.payload)).celsius;
    } catch (e) {
      throw { tag: "reject", val: `not a reading: ${e.message}` };
    }
    if (typeof celsius !== "number") {
      throw { tag: "reject", val: "not a reading: no numeric celsius" };
    }

    const on = celsius < SETPOINT - HYSTERESIS;
    console.log(`${ctx.id} attempt ${ctx.attempt}: ${msg.topic} ${celsius} C -> heating ${on ? "on" : "off"}`);
    send({
      topic: `devices/${parts[1]}/heating`,
      payload: new TextEncoder().encode(JSON.stringify({ on, celsius, setpoint: SETPOINT })),
      qos: "at-least-once",
      retain: false,
      contentType: "application/json",
      responseTopic: undefined,
      correlationData: msg.correlationData,
      userProperties: [],
    });
  },
};

// Publishes; a refusal (denied, invalid topic, past the budget) rejects.
function send(message) {
  try {
    publish(message);
  } catch (e) {
    const error = e.payload ?? e;
    throw { tag: "reject", val: String(error.val ?? error) };
  }
}

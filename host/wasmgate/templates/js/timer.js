// %%name%%: a heartbeat on a timer, built with ComponentizeJS.
//
// Every tick publishes {"component": ..., "schedule": ..., "fired_at_ms": ...,
// "missed": ...} to heartbeat/<component> at QoS 1, so whoever watches the
// gateway sees it alive (and how many ticks it missed while it was down). A
// heartbeat the host refuses to publish (not granted, or past the
// invocation's publish budget) fails the tick without a retry.
//
// A handler returns for success and throws a handler-error
// ({tag: "retry" | "reject", val: reason}) for failure.

import { publish } from "wasmgate:edge/mqtt-publisher@0.1.0";

export const timerHandler = {
  onTick(ctx, tick) {
    const beat = {
      component: ctx.component,
      schedule: tick.schedule,
      fired_at_ms: Number(tick.firedAtMs),
      missed: tick.missed,
    };
    console.log(`${ctx.id} (${tick.schedule}): heartbeat, ${tick.missed} missed`);
    try {
      publish({
        topic: `heartbeat/${ctx.component}`,
        payload: new TextEncoder().encode(JSON.stringify(beat)),
        qos: "at-least-once",
        retain: false,
        contentType: "application/json",
        responseTopic: undefined,
        correlationData: undefined,
        userProperties: [],
      });
    } catch (e) {
      const error = e.payload ?? e;
      throw { tag: "reject", val: String(error.val ?? error) };
    }
  },
};

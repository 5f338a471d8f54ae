//! Host bindings of the `wasmgate:edge` WIT package (`wit/edge.wit`).
//!
//! Generated for the `event-app` world (MQTT and timer handlers plus the MQTT
//! publisher, and `wasi:keyvalue`, which every world imports); HTTP uses
//! wasmtime-wasi-http's own bindings.

#![allow(missing_docs, unreachable_pub)]

wasmtime::component::bindgen!({
    path: "../../wit",
    world: "wasmgate:edge/event-app",
    imports: { default: async },
    exports: { default: async },
    require_store_data_send: true,
    with: { "wasi:keyvalue/store.bucket": crate::keyvalue::Bucket },
});

pub(crate) use self::exports::wasmgate::edge::mqtt_handler::GuestIndices as MqttHandlerIndices;
pub(crate) use self::exports::wasmgate::edge::timer_handler::{
    GuestIndices as TimerHandlerIndices, Tick,
};
pub(crate) use self::wasi::keyvalue;
pub(crate) use self::wasmgate::edge::mqtt_publisher::PublishError;
pub(crate) use self::wasmgate::edge::mqtt_types::{Message, Qos};
pub(crate) use self::wasmgate::edge::types::{HandlerError, Invocation};
pub(crate) use self::wasmgate::edge::{mqtt_publisher, mqtt_types, types};

pub(crate) type Bindings = EventApp;

/// The `kv-stream-app` world, for its export (`kv-stream-handler`); its
/// imports are those generated above.
pub(crate) mod kv_stream {
    wasmtime::component::bindgen!({
        path: "../../wit",
        world: "wasmgate:edge/kv-stream-app",
        imports: { default: async },
        exports: { default: async },
        require_store_data_send: true,
        with: {
            "wasmgate:edge/types": super::wasmgate::edge::types,
            "wasmgate:edge/mqtt-types": super::wasmgate::edge::mqtt_types,
            "wasmgate:edge/mqtt-publisher": super::wasmgate::edge::mqtt_publisher,
            "wasi:keyvalue/store": super::wasi::keyvalue::store,
            "wasi:keyvalue/atomics": super::wasi::keyvalue::atomics,
            "wasi:keyvalue/batch": super::wasi::keyvalue::batch,
        },
    });
}

pub(crate) use self::kv_stream::exports::wasmgate::edge::kv_stream_handler::{
    Change, Gap, GuestIndices as KvStreamHandlerIndices, Operation, Writer,
};

/// `wasi:keyvalue@0.2.0-draft2`, on the same resource types as
/// `0.2.0-draft`. Its WIT is the host's own (`host/runtime/wit`), not in
/// `wit/`: two versions of one package there would rename the guests'
/// bindings (`keyvalue0_2_0_draft`); Spin's guests bring their own.
pub(crate) mod draft2 {
    wasmtime::component::bindgen!({
        path: "wit/keyvalue-draft2",
        world: "wasi:keyvalue/imports@0.2.0-draft2",
        imports: { default: async },
        require_store_data_send: true,
        with: {
            "wasi:keyvalue/store.bucket": crate::keyvalue::Bucket,
            "wasi:keyvalue/atomics.cas": crate::keyvalue::Cas,
        },
    });
}

"""The OpenAPI 3.1 description of every preserved path, served at /api/openapi.json."""

from __future__ import annotations

from typing import Any

from rapido import __version__
from rapido.http.settings import HttpSettings
from rapido.pipeline.audio import MAX_RATE, MIN_RATE
from rapido.pipeline.sinks import SINK_NAMES as SINKS


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


_PHASE = {"type": "object", "required": ["percent", "duration_s"],
          "additionalProperties": False,
          "properties": {"percent": {"type": "integer", "minimum": 1, "maximum": 100},
                         "duration_s": {"type": "number", "exclusiveMinimum": 0}}}
_SESSION_ID = {
    "name": "session_id", "in": "path", "required": True,
    # {node id (1-64)}.{32 hex}; older and single-node-fallback ids are 32 hex.
    "schema": {"type": "string", "minLength": 1, "maxLength": 129},
}


def openapi_document(config: HttpSettings) -> dict[str, Any]:
    secured: list[dict[str, list[str]]] = [{"bearer": []}] if config.auth_required else []
    errors = ({"401": _error("missing or wrong API key")} if config.auth_required else
              {"403": _error("keyless node: Host is not this node on a loopback name, or "
                             "Origin is not this node's own")})
    # In a cluster a session may live on another node: its requests are relayed there
    # (the answers are that node's) or, with cluster_redirect, redirected; these are the
    # relay's own answers.
    lost = ("or its node has failed or left the cluster (node_lost: create the lesson's "
            "session again)")
    relay: dict[str, Any] = {
        "502": _error("the node that holds the session could not be reached "
                      "(node_unreachable)"),
        "508": _error("nodes disagree on where the session lives (loop_detected)"),
    }
    if config.cluster_redirect:
        relay["307"] = {"description": "the session lives on another node: repeat the "
                                       "request at Location",
                        "headers": {"Location": {"schema": {"type": "string"}}}}
    session_errors = {**errors, "404": _error(f"unknown session (session_not_found), {lost}"),
                      **relay}
    schemas: dict[str, Any] = {
        "Error": {
            "type": "object", "required": ["error", "message"],
            "properties": {"error": {"type": "string"}, "message": {"type": "string"}},
        },
        "Location": {
            "oneOf": [
                {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$",
                 "description": "a region code"},
                {"type": "object", "required": ["lat", "lon"], "additionalProperties": False,
                 "properties": {"lat": {"type": "number", "minimum": -90, "maximum": 90},
                                "lon": {"type": "number", "minimum": -180, "maximum": 180}}},
            ],
        },
        "SessionCreate": {
            "type": "object", "required": ["lesson_id"], "additionalProperties": False,
            "properties": {
                "lesson_id": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                "user_id": {"type": "string", "pattern": "^[^\\x00-\\x1f\\x7f]{1,128}$"},
                "user_location": _ref("Location"),
                "avatar": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$",
                           "default": "default"},
                "sample_rate": {"type": "integer", "minimum": MIN_RATE, "maximum": MAX_RATE,
                                "default": 16000,
                                "description": "rate of the PCM sent on the WebSocket"},
                "sink": {"type": "string", "enum": list(SINKS), "default": config.default_sink},
                "agent_identity": {"type": "string", "pattern": "^[A-Za-z0-9_.:@-]{1,128}$",
                                   "description": "serve this LiveKit Agents voice agent as "
                                   "its avatar (implies sink livekit)"},
                "room": {"type": "string", "pattern": "^[A-Za-z0-9_.:@-]{1,128}$",
                         "description": "the agent's LiveKit room (default lesson_{id})"},
            },
        },
        "SessionStats": {
            "type": "object",
            "properties": {
                "state": {"type": "string"},
                "buffered_ms": {"type": "number"},
                "target_ms": {"type": "number"},
                "underruns": {"type": "integer"},
                "frames_out": {"type": "integer"},
                "degraded_frames": {"type": "integer", "description":
                                    "frames whose mouth is not the model's for that frame "
                                    "(repeated at half rate, or idle after a failure)"},
                "playout_position_ms": {"type": "number"},
                "played_ms": {"type": "number"},
                "accelerated_ms": {"type": "number", "description":
                                   "speech removed by time-stretching (jitter_stretch)"},
                "decelerated_ms": {"type": "number", "description":
                                   "speech inserted by time-stretching (jitter_stretch)"},
            },
        },
        "Session": {
            "type": "object",
            "required": ["session_id", "lesson_id", "room_name", "state", "node", "ws_url",
                         "created_at"],
            "properties": {
                "session_id": {"type": "string"},
                "lesson_id": {"type": "string"},
                "user_id": {"type": ["string", "null"]},
                "room_name": {"type": "string"},
                "state": {"type": "string",
                          "enum": ["idle", "speaking", "interrupted", "closed"]},
                "node": {"type": "string"},
                "region": {"type": "string"},
                "avatar": {"type": "string"},
                "sink": {"type": "string"},
                "sample_rate": {"type": "integer"},
                "fps": {"type": "integer"},
                "width": {"type": "integer"},
                "height": {"type": "integer"},
                "ws_url": {"type": "string"},
                "ws_token": {"type": "string", "description": "short-lived token for this "
                             "session's WebSocket alone (ws_url?token=...): what a browser "
                             "connects with, instead of the API key"},
                "audio_url": {"type": "string"},
                "whep_url": {"type": "string", "description": "sink webrtc only: POST an "
                             "SDP offer here to watch (WHEP)"},
                "viewer_token": {"type": "string", "description": "sink webrtc only: "
                                 "short-lived token for whep_url, scoped to this session"},
                "created_at": {"type": "string", "format": "date-time"},
                "stats": _ref("SessionStats"),
            },
        },
        "SessionList": {
            "type": "object", "required": ["sessions"],
            "properties": {"sessions": {"type": "array", "items": _ref("Session")}},
        },
        "AudioQueued": {
            "type": "object", "required": ["session_id", "duration_ms", "queued_ms"],
            "properties": {"session_id": {"type": "string"},
                           "duration_ms": {"type": "number"},
                           "input_sample_rate": {"type": "integer"},
                           "queued_ms": {"type": "number"}},
        },
        "ClusterMember": {
            "type": "object",
            "required": ["node_id", "state", "region", "version", "load", "capacity",
                         "free_slots", "draining", "url"],
            "properties": {
                "node_id": {"type": "string"},
                "state": {"type": "string", "description": "Serf's status of the member: "
                          "alive, leaving, left, failed"},
                "region": {"type": ["string", "null"]},
                "version": {"type": "string"},
                "load": {"type": "number"},
                "capacity": {"type": "integer"},
                "free_slots": {"type": "integer", "description": "as gossiped: coarse "
                               "(steps of a sixteenth of the capacity) for other members"},
                "draining": {"type": "boolean"},
                "url": {"type": "string"},
            },
        },
        "Cluster": {
            "type": "object", "required": ["node", "members", "cluster"],
            "properties": {
                "node": _ref("ClusterMember"),
                "members": {"type": "array", "items": _ref("ClusterMember")},
                "cluster": {"type": "string", "enum": ["single", "ok", "degraded"],
                            "description": "single: no cluster configured; degraded: "
                            "this node could not join (it serves alone), its agent is "
                            "gone, or a member failed"},
                "error": {"type": "string", "description": "why it is degraded"},
                "rollout": _ref("Rollout"),
            },
        },
        "Rollout": {
            "type": "object", "required": ["epoch", "state", "version", "phases"],
            "description": "The cluster's rollout as this node holds it",
            "properties": {
                "epoch": {"type": "integer", "description": "Lamport time of the Serf "
                          "event that made this state (0: none seen)"},
                "id": {"type": "string"},
                "version": {"type": "string"},
                "state": {"type": "string", "enum": ["none", "running", "complete",
                                                     "aborted", "rolled_back"]},
                "percent": {"type": "integer", "description": "share of users (by md5 "
                            "bucket) whose new sessions go to the version now"},
                "phase": {"type": "integer"},
                "next_phase_at": {"type": "number"},
                "phases": {"type": "array", "items": _PHASE},
                "started_at": {"type": "number"},
                "ended_at": {"type": ["number", "null"]},
                "reason": {"type": ["string", "null"]},
                "by": {"type": ["string", "null"]},
            },
        },
        "Interrupted": {
            "type": "object", "required": ["session_id", "interrupted", "position_ms"],
            "properties": {"session_id": {"type": "string"},
                           "interrupted": {"type": "boolean"},
                           "was_playing": {"type": "boolean"},
                           "position_ms": {"type": "number"},
                           "dropped_frames": {"type": "integer"}},
        },
    }
    paths: dict[str, Any] = {
        "/api/sessions": {
            "post": {
                "summary": "Create the avatar stream of a lesson (idempotent per lesson)",
                "operationId": "createSession", "security": secured,
                "requestBody": {"required": True, "content": {
                    "application/json": {"schema": _ref("SessionCreate")}}},
                "responses": {
                    "201": _json(_ref("Session"), "created"),
                    "200": _json(_ref("Session"), "the lesson already had a live session"),
                    "400": _error("invalid request"),
                    "404": _error("unknown avatar"),
                    "408": _error("the body did not arrive within http_read_timeout_s"),
                    "413": _error("body too large"),
                    "415": _error("without an api_key: the body is not application/json"),
                    "503": _error("at capacity or draining (in a cluster: every node "
                                  "that could take it); see Retry-After"),
                    "508": _error("in a cluster: forwarded twice already (the nodes' "
                                  "views disagree for a moment); retry"),
                    **errors,
                },
            },
            "get": {
                "summary": "List live sessions", "operationId": "listSessions",
                "security": secured,
                "responses": {"200": _json(_ref("SessionList"), "sessions"), **errors},
            },
        },
        "/api/demo": {
            "post": {
                "summary": "Start a demo session (webrtc sink) that speaks a built-in "
                           "synthetic utterance; the viewer page's Demo button",
                "operationId": "createDemo", "security": secured,
                "responses": {"201": _json(_ref("Session"), "created; speech starts ~1.5 s in"),
                              "503": _error("at capacity or draining"), **errors},
            },
        },
        "/api/sessions/{session_id}": {
            "parameters": [_SESSION_ID],
            "get": {"summary": "One session with live stats", "operationId": "getSession",
                    "security": secured,
                    "responses": {"200": _json(_ref("Session"), "the session"),
                                  **session_errors}},
            "delete": {"summary": "End a session", "operationId": "deleteSession",
                       "security": secured,
                       "responses": {"200": _json(_ref("Session"), "closed; final stats"),
                                     **session_errors}},
        },
        "/api/sessions/{session_id}/audio": {
            "parameters": [_SESSION_ID],
            "post": {
                "summary": "Queue one utterance (WAV, or raw PCM as audio/L16;rate=N)",
                "operationId": "uploadAudio", "security": secured,
                "requestBody": {"required": True, "content": {
                    "audio/wav": {"schema": {"type": "string", "format": "binary"}},
                    "audio/L16": {"schema": {"type": "string", "format": "binary"}},
                }},
                "responses": {
                    "202": _json(_ref("AudioQueued"), "queued behind earlier utterances"),
                    "400": _error("malformed audio"),
                    "408": _error("the body did not arrive within http_read_timeout_s"),
                    "413": _error("body too large"),
                    "415": _error("unsupported audio format"),
                    "429": _error("too much speech queued (queue_full, from the header's "
                                  "length), or too many uploads in progress "
                                  "(too_many_uploads); both with Retry-After"),
                    **session_errors,
                },
            },
        },
        "/api/sessions/{session_id}/interrupt": {
            "parameters": [_SESSION_ID],
            "post": {"summary": "Barge-in: flush buffered speech and queued frames",
                     "operationId": "interruptSession", "security": secured,
                     "responses": {"200": _json(_ref("Interrupted"), "flushed"),
                                   **session_errors}},
        },
        "/ws/sessions/{session_id}": {
            "parameters": [_SESSION_ID],
            "get": {
                "summary": "WebSocket: PCM s16le mono in (binary), JSON control in "
                           "(start, end, interrupt, ping); events out (ready, "
                           "playback_started, playback_finished, underrun, refill, error, "
                           "pong, closed; closed with reason node_lost when the session's "
                           "node is gone)",
                "operationId": "sessionSocket",
                "security": [*secured, {"wsToken": []}] if secured else [],
                "responses": {"101": {"description": "switching to WebSocket"},
                              "400": _error("not a WebSocket request"),
                              # relayed, never redirected
                              **{k: v for k, v in session_errors.items() if k != "307"}},
            },
        },
        "/whep/{session_id}": {
            "parameters": [_SESSION_ID],
            "post": {
                "summary": "WHEP: watch a session with sink webrtc; SDP offer in, SDP "
                           "answer out (ICE gathered, no trickle; a viewer not connected "
                           "within whep_connect_timeout_s is closed)",
                "operationId": "whepOffer", "security": [{"viewerToken": []}],
                "requestBody": {"required": True, "content": {
                    "application/sdp": {"schema": {"type": "string"}}}},
                "responses": {
                    "201": {"description": "the SDP answer; Location names the viewer",
                            "headers": {"Location": {"schema": {"type": "string"}}},
                            "content": {"application/sdp": {"schema": {"type": "string"}}}},
                    "400": _error("malformed or unusable SDP offer"),
                    "401": _error("missing, wrong or expired viewer token"),
                    "404": _error(f"unknown session, {lost}"),
                    "409": _error("the session's sink is not webrtc (not_webrtc), or the "
                                  "session is closing (session_closing)"),
                    "413": _error("the SDP offer is over 64 KiB"),
                    "415": _error("the body is not application/sdp"),
                    "503": _error("the stream has its limit of viewers (webrtc_max_viewers)"),
                    **relay,
                },
            },
        },
        "/whep/{session_id}/{viewer_id}": {
            "parameters": [_SESSION_ID, {"name": "viewer_id", "in": "path", "required": True,
                                         "schema": {"type": "string", "minLength": 1}}],
            "delete": {
                "summary": "WHEP: end one viewer", "operationId": "whepDelete",
                "security": [{"viewerToken": []}],
                "responses": {"200": {"description": "the viewer is gone"},
                              "401": _error("missing, wrong or expired viewer token"),
                              "404": _error(f"unknown session or viewer, {lost}"),
                              "409": _error("the session's sink is not webrtc"), **relay},
            },
        },
        "/api/cluster": {
            "get": {"summary": "This node, the cluster members it sees and their state",
                    "operationId": "getCluster", "security": secured,
                    "responses": {"200": _json(_ref("Cluster"), "the cluster"), **errors}},
        },
        "/api/cluster/claims": {
            "post": {"summary": "Between nodes: the sessions a node plays of lessons this "
                                "node is home of; the answer names those that lost to "
                                "another session of their lesson (closed as 'moved')",
                     "operationId": "takeClaims", "security": secured,
                     "requestBody": {"required": True, "content": {"application/json": {
                         "schema": {"type": "object", "required": ["node", "claims"],
                                    "properties": {
                                        "node": {"type": "string"},
                                        "claims": {"type": "array", "items": {
                                            "type": "object",
                                            "required": ["lesson_id", "session_id",
                                                         "created_at"],
                                            "properties": {
                                                "lesson_id": {"type": "string"},
                                                "session_id": {"type": "string"},
                                                "created_at": {"type": "number"}}}}}}}}},
                     "responses": {
                         "200": _json({"type": "object", "required": ["moved"],
                                       "properties": {"moved": {
                                           "type": "array", "items": {"type": "string"}}}},
                                      "recorded"),
                         "400": _error("malformed claims"),
                         "404": _error("this node is not part of a cluster"), **errors}},
        },
        "/api/cluster/moved": {
            "post": {"summary": "Between nodes: close these sessions of this node, which "
                                "lost their lesson to another session, with reason 'moved'",
                     "operationId": "moveSessions", "security": secured,
                     "requestBody": {"required": True, "content": {"application/json": {
                         "schema": {"type": "object", "required": ["session_ids"],
                                    "properties": {"session_ids": {
                                        "type": "array", "items": {"type": "string"}}}}}}},
                     "responses": {
                         "200": _json({"type": "object", "required": ["closed"],
                                       "properties": {"closed": {"type": "integer"}}},
                                      "how many were closed"),
                         "400": _error("malformed body"),
                         "404": _error("this node is not part of a cluster"), **errors}},
        },
        "/api/admin/drain": {
            "post": {"summary": "Drain this node as SIGTERM does: no new sessions, speech "
                                "in flight plays out for up to drain_timeout_s, the rest "
                                "close (reason moved in a cluster), the node leaves the "
                                "cluster and exits 0. Idempotent.",
                     "operationId": "drainNode", "security": secured,
                     "responses": {"202": _json({
                         "type": "object", "required": ["draining", "drain_timeout_s"],
                         "properties": {"draining": {"type": "boolean", "const": True},
                                        "drain_timeout_s": {"type": "number"}}},
                         "the drain has started (or had already)"), **errors}},
        },
        "/api/admin/rollout": {
            "get": {"summary": "The cluster's rollout as this node holds it, the versions "
                               "its members run, the rollout events it took",
                    "operationId": "getRollout", "security": secured,
                    "responses": {"200": _json({
                        "type": "object", "required": ["rollout", "node_version"],
                        "properties": {"rollout": _ref("Rollout"),
                                       "node_version": {"type": "string"},
                                       "versions": {"type": "array",
                                                    "items": {"type": "string"}},
                                       "events": {"type": "object"}}}, "the rollout"),
                                  **errors}},
            "post": {"summary": "Start a rollout of a version some member runs, in phases "
                                "of growing percent (replaces one running)",
                     "operationId": "startRollout", "security": secured,
                     "requestBody": {"required": True, "content": {"application/json": {
                         "schema": {"type": "object", "required": ["version", "phases"],
                                    "additionalProperties": False,
                                    "properties": {
                                        "version": {"type": "string"},
                                        "phases": {"type": "array", "minItems": 1,
                                                   "maxItems": 10, "items": _PHASE}}}}}},
                     "responses": {
                         "202": _json({"type": "object", "required": ["rollout"],
                                       "properties": {"rollout": _ref("Rollout")}},
                                      "sent to the cluster"),
                         "400": _error("unknown version, a percent out of 1..100, phases "
                                       "out of order or otherwise malformed"),
                         "404": _error("this node is not part of a cluster"),
                         "503": _error("the cluster's agent could not take the event"),
                         **errors}},
        },
        "/api/admin/rollout/abort": {
            "post": {"summary": "End the running rollout: 0 %, new sessions avoid its "
                                "version", "operationId": "abortRollout",
                     "security": secured,
                     "responses": {
                         "200": _json({"type": "object", "required": ["rollout"],
                                       "properties": {"rollout": _ref("Rollout")}},
                                      "aborted"),
                         "404": _error("this node is not part of a cluster"),
                         "409": _error("no rollout is running"),
                         "503": _error("the cluster's agent could not take the event"),
                         **errors}},
        },
        "/api/admin/health/drill": {
            "post": {"summary": "Rehearse a rollback: made-up figures added to this node's "
                                "health window (only with health_drills on)",
                     "operationId": "drillHealth", "security": secured,
                     "requestBody": {"required": True, "content": {"application/json": {
                         "schema": {"type": "object", "additionalProperties": False,
                                    "properties": {k: {"type": "integer", "minimum": 0}
                                                   for k in ("ended", "errors", "underruns",
                                                             "gpu_memory_errors", "frames")}
                                    | {"latency_ms": {"type": "number", "minimum": 0}}}}}},
                     "responses": {"200": _json({"type": "object"}, "the node's figures"),
                                   "400": _error("malformed drill"),
                                   "404": _error("drills are off (health_drills)"),
                                   **errors}},
            "delete": {"summary": "Clear the drilled figures",
                       "operationId": "clearHealthDrill", "security": secured,
                       "responses": {"200": _json({"type": "object"}, "the node's figures"),
                                     "404": _error("drills are off (health_drills)"),
                                     **errors}},
        },
        "/health": {"get": {"summary": "Liveness", "operationId": "health",
                            "responses": {"200": _json({"type": "object"}, "alive")}}},
        "/ready": {"get": {"summary": "Readiness: 503 while starting or draining",
                           "operationId": "ready",
                           "responses": {"200": _json({"type": "object"}, "ready"),
                                         "503": _json({"type": "object"}, "not ready")}}},
        "/metrics": {"get": {"summary": "Prometheus metrics", "operationId": "metrics",
                             "responses": {"200": {"description": "text exposition format",
                                                   "content": {"text/plain": {}}}}}},
        "/api/openapi.json": {"get": {"summary": "This document", "operationId": "openapi",
                                      "responses": {"200": _json({"type": "object"},
                                                                 "OpenAPI 3.1")}}},
    }
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "rapido", "version": __version__,
                 "description": "Speech audio in, a lip-synced talking-avatar stream out."},
        "paths": paths,
        "components": {"schemas": schemas},
    }
    # Viewers never hold the API key: /whep takes the session's viewer_token (as a
    # bearer header or ?token=), whether or not the API itself needs a key.
    schemes: dict[str, Any] = {"viewerToken": {"type": "http", "scheme": "bearer"}}
    if config.auth_required:
        schemes["bearer"] = {"type": "http", "scheme": "bearer"}
        # A browser's WebSocket: the session's ws_token (never the key) in the URL.
        schemes["wsToken"] = {"type": "apiKey", "in": "query", "name": "token"}
    doc["components"]["securitySchemes"] = schemes
    return doc

"""The Voice API and the project API as an OpenAPI 3 document (served at /voice/v1/openapi.json; schemathesis tests against it)."""

from __future__ import annotations

from typing import Any


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _ok(schema: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}


_ROOM = {"name": "room_id", "in": "path", "required": True, "schema": {"type": "string", "maxLength": 64},
         "description": "the room (PUT also takes `new`: a new room is created first)"}
_VOICE = {"name": "voice_id", "in": "path", "required": True, "schema": {"type": "string", "maxLength": 64}}
_RECORDING = {"name": "recording_id", "in": "path", "required": True, "schema": {"type": "string", "maxLength": 64},
              "description": "32 hex digits, as `recording_started`/`recording_ready` and the listing say"}
_COMMON = {"401": _error("missing or wrong credentials (the EnableX table says 407; HTTP reserves 407 for proxies)"),
           "400": _error("invalid input: `error.field` names the field"),
           "404": _error("room_id or voice_id not found in this project"),
           "429": _error("too many failed authentications from this address (code too_many_auth_failures), or, "
                         "on dial, the project's outbound caps (too_many_concurrent_calls, too_many_calls); "
                         "the Retry-After header says when to retry")}

OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "gateway Voice API", "version": "1.0.0",
             "description": "Dial phones into video rooms, bridge live calls, remove them; call progress goes to "
                            "webhooks signed with X-Voice-Timestamp: <unix seconds> and X-Voice-Signature: "
                            "v1=HMAC-SHA256(webhook_secret, \"<timestamp>.<body>\")."},
    "servers": [{"url": "/"}],
    "security": [{"basic": []}],
    "paths": {
        "/voice/v1/room/{room_id}/join": {
            "post": {
                "summary": "Dial a number out through the project's trunk and bridge it into the room when answered",
                "parameters": [_ROOM],
                "requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Dial"}}}},
                "responses": {"200": _ok("CallState", "the call is being placed (state initiated)"), **_COMMON,
                              "403": _error("the destination is not allowed for this project (code "
                                            "destination_not_allowed: a denied prefix, or sip: not enabled)"),
                              "500": _error("outbound call failed (no outbound trunk)"),
                              "503": _error("at capacity or draining")},
            }
        },
        "/voice/v1/room/{room_id}/call/{voice_id}/join": {
            "put": {
                "summary": "Bridge a live call (in the IVR, parked, an `api` DID, or in another room) into the room",
                "parameters": [_ROOM, _VOICE],
                "responses": {"200": _ok("CallState", "the call is in the room (state joined)"), **_COMMON,
                              "409": _error("the call is not in a bridgeable state (call_not_bridgeable), or it has "
                                            "ended meanwhile (call_ended: e.g. the caller hung up after `incoming`)"),
                              "500": _error("room join failed")},
            }
        },
        "/voice/v1/room/{room_id}/call/{voice_id}": {
            "delete": {
                "summary": "Take the call out of the room and hang up (or park it on hold with park=true)",
                "parameters": [_ROOM, _VOICE, {"name": "park", "in": "query", "required": False,
                                               "schema": {"type": "string", "enum": ["true", "false"]}}],
                "responses": {"200": _ok("CallState", "removed"), **_COMMON,
                              "409": _error("the call is not in this room, or it has ended (call_ended)")},
            }
        },
        "/voice/v1/calls": {
            "get": {
                "summary": "The project's calls, newest first",
                "parameters": [{"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
                               {"name": "active", "in": "query", "schema": {"type": "string", "enum": ["true", "false"]}}],
                "responses": {"200": _ok("CallList", "calls"), "400": _COMMON["400"], "401": _COMMON["401"],
                              "429": _COMMON["429"]},
            }
        },
        "/voice/v1/calls/{voice_id}": {
            "get": {
                "summary": "One call: its state and every CDR event",
                "parameters": [_VOICE],
                "responses": {"200": _ok("Call", "the call"), "401": _COMMON["401"], "404": _COMMON["404"],
                              "429": _COMMON["429"]},
            }
        },
        "/voice/v1/call/{voice_id}/recording": {
            "post": {
                "summary": "Start recording a live, answered call: two channels (the caller; what the caller hears)",
                "parameters": [_VOICE],
                "responses": {"200": _ok("RecordingState", "recording"), "401": _COMMON["401"],
                              "404": _COMMON["404"], "429": _COMMON["429"],
                              "409": _error("not answered yet (call_not_answered), being recorded already "
                                            "(already_recording), or ended (call_ended)")},
            },
            "delete": {
                "summary": "Stop recording the call: the file is finalised, then `recording_ready` is posted",
                "parameters": [_VOICE],
                "responses": {"200": _ok("RecordingState", "stopped"), "401": _COMMON["401"],
                              "404": _COMMON["404"], "429": _COMMON["429"],
                              "409": _error("not being recorded (not_recording), or ended (call_ended)")},
            },
        },
        "/voice/v1/recordings": {
            "get": {
                "summary": "The project's recordings (calls' and rooms'), newest first",
                "parameters": [{"name": "voice_id", "in": "query", "required": False,
                                "schema": {"type": "string", "maxLength": 64}},
                               {"name": "room_id", "in": "query", "required": False,
                                "schema": {"type": "string", "maxLength": 64}}],
                "responses": {"200": _ok("RecordingList", "recordings"), "401": _COMMON["401"],
                              "429": _COMMON["429"]},
            }
        },
        "/voice/v1/recordings/{recording_id}": {
            "get": {
                "summary": "One recording's metadata",
                "parameters": [_RECORDING],
                "responses": {"200": _ok("Recording", "the recording"), "401": _COMMON["401"],
                              "404": _error("no such recording in this project"), "429": _COMMON["429"]},
            },
            "delete": {
                "summary": "Delete a finished recording",
                "parameters": [_RECORDING],
                "responses": {"200": {"description": "deleted", "content": {"application/json": {"schema": {
                                  "type": "object", "required": ["deleted"], "properties": {
                                      "deleted": {"type": "boolean"}, "recording_id": {"type": "string"}}}}}},
                              "401": _COMMON["401"], "404": _error("no such recording in this project"),
                              "409": _error("still recording (recording_in_progress)"), "429": _COMMON["429"]},
            },
        },
        "/voice/v1/recordings/{recording_id}/file": {
            "get": {
                "summary": "The recording: WAV, PCM 16-bit, 8 kHz, two channels (Range requests: 206)",
                "parameters": [_RECORDING],
                "responses": {"200": {"description": "the file", "content": {"audio/wav": {"schema": {
                                  "type": "string", "format": "binary"}}}},
                              "206": {"description": "the requested range", "content": {"audio/wav": {"schema": {
                                  "type": "string", "format": "binary"}}}},
                              "401": _COMMON["401"], "404": _error("no such recording in this project"),
                              "409": _error("not finished, or failed (recording_not_ready)"),
                              "416": {"description": "a range outside the file"}, "429": _COMMON["429"]},
            }
        },
        "/voice/v1/openapi.json": {
            "get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI 3"}, "401": _COMMON["401"],
                                                              "429": _COMMON["429"]}}
        },
    },
    "components": {
        "securitySchemes": {"basic": {"type": "http", "scheme": "basic", "description": "app_id:app_key of a project "
                                      "(/cpaas also takes the operator's api_user:api_key)"}},
        "schemas": {
            "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                "type": "object", "required": ["code", "message"],
                "properties": {"code": {"type": "string"}, "message": {"type": "string"}, "field": {"type": "string"}}}}},
            "Dial": {"type": "object", "required": ["from", "to"], "properties": {
                "name": {"type": "string", "maxLength": 128},
                "owner_ref": {"type": "string", "maxLength": 128},
                "from": {"type": "string", "description": "one of the project's numbers with out=true (E.164: "
                                                          "optional +, 6 to 15 ASCII digits)"},
                "to": {"type": "string", "maxLength": 256, "description": "E.164 number (optional +, 6 to 15 ASCII "
                       "digits), or sip:user@host[:port] where the project allows sip: URIs (never with ;parameters "
                       "or ?headers); premium-rate prefixes are refused (api.deny_prefixes)"},
                "event_url": {"type": "string", "description": "webhook for this call (default: the project's notification_url); "
                              "an http(s) URL whose host has public addresses only (unless webhooks.allow_networks)"}}},
            "CallState": {"type": "object", "required": ["state", "voice_id", "room_id", "timestamp"], "properties": {
                "state": {"type": "string", "enum": ["initiated", "joined", "removed"]},
                "voice_id": {"type": "string"}, "room_id": {"type": "string"},
                "timestamp": {"type": "string", "format": "date-time"}}},
            "Call": {"type": "object", "required": ["voice_id", "state"], "properties": {
                "voice_id": {"type": "string"}, "direction": {"type": "string"},
                "from": {"type": "string", "nullable": True}, "to": {"type": "string", "nullable": True},
                "state": {"type": "string"}, "room_id": {"type": "string", "nullable": True},
                "reason": {"type": "string", "nullable": True}, "sip_code": {"type": "integer", "nullable": True},
                "started_at": {"type": "number"}, "answered_at": {"type": "number", "nullable": True},
                "ended_at": {"type": "number", "nullable": True}, "phase": {"type": "string"},
                "events": {"type": "array", "items": {"type": "object"}}}},
            "RecordingState": {"type": "object", "required": ["state", "voice_id", "recording_id"], "properties": {
                "state": {"type": "string", "enum": ["recording", "stopped"]}, "voice_id": {"type": "string"},
                "recording_id": {"type": "string"}, "timestamp": {"type": "string", "format": "date-time"}}},
            "Recording": {"type": "object", "required": ["id", "voice_id", "state"], "properties": {
                "id": {"type": "string"}, "voice_id": {"type": "string"}, "room_id": {"type": "string", "nullable": True},
                "state": {"type": "string", "enum": ["recording", "ready", "repaired", "failed"]},
                "format": {"type": "string"}, "channels": {"type": "integer"}, "rate": {"type": "integer"},
                "started_at": {"type": "number"}, "ended_at": {"type": "number"}, "duration_s": {"type": "number"},
                "size": {"type": "integer"}, "sha256": {"type": "string"}, "error": {"type": "string"},
                "url": {"type": "string"}}},
            "RecordingList": {"type": "object", "required": ["recordings"], "properties": {
                "recordings": {"type": "array", "items": {"$ref": "#/components/schemas/Recording"}}}},
            "CallList": {"type": "object", "required": ["calls"], "properties": {
                "calls": {"type": "array", "items": {"$ref": "#/components/schemas/Call"}}}},
        },
    },
}


# -- the CPaaS project API (api/projects.py): the EnableX "Projects" document's shape
def _cpaas_error(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/CpaasError"}}}}


_APP_ID = {"name": "app_id", "in": "path", "required": True, "schema": {"type": "string", "maxLength": 64}}
_CPAAS_COMMON = {
    "400": _cpaas_error("invalid input (1004 JSON, 1005 a field, 1008 category, 1009 services, 1012 not supported)"),
    "401": _cpaas_error("missing or wrong credentials (1001)"),
    "403": _cpaas_error("a project's credentials act on that project only, and never create one (1002)"),
    "429": _cpaas_error("too many failed authentications from this address (1003); Retry-After says when")}
_ONE = {**_CPAAS_COMMON, "404": _cpaas_error("no project with this app_id (1007)")}
_PHONE = {"type": "object", "required": ["phone"], "properties": {
    "phone": {"type": "string", "description": "E.164: optional +, 6 to 15 ASCII digits"},
    "in": {"type": "boolean"}, "out": {"type": "boolean"}, "country": {"type": "string", "maxLength": 64},
    "country_code": {"type": "string", "pattern": "^\\+?[0-9]{1,4}$"},
    "route": {"type": "string", "enum": ["api", "ivr"], "description": "voice numbers only (this gateway's own "
              "field): api = answered and held for the application, ivr = the dial-in prompts"}}}
_DETAILS = {
    "app_name": {"type": "string", "minLength": 1, "maxLength": 64},
    "category_id": {"type": "integer", "enum": [1, 2, 3, 4, 5, 6, 7]},
    "short_desc": {"type": "string", "maxLength": 128}, "description": {"type": "string", "maxLength": 1024},
    "services_incl": {"type": "array", "minItems": 1, "items": {"type": "string", "enum": ["voice", "video"]}}}

OPENAPI["paths"].update({
    "/cpaas/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI 3"},
                                                                             "401": _CPAAS_COMMON["401"]}}},
    "/cpaas/projects": {
        "get": {"summary": "The projects the credentials see (the operator: all; a project: itself), a page at a time",
                "parameters": [
                    {"name": "page", "in": "query", "schema": {"type": "integer", "minimum": 1}},
                    {"name": "per_page", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
                    {"name": "order", "in": "query", "schema": {"type": "string", "enum": ["asc", "desc"]}},
                    {"name": "app_name", "in": "query", "schema": {"type": "string", "maxLength": 64}},
                    {"name": "category_id", "in": "query", "schema": {"type": "integer"}}],
                "responses": {"200": _ok("ProjectPage", "projects and the search block"), **_CPAAS_COMMON}},
        "post": {"summary": "Create a project (the operator's credentials only): its app_id, app_key and webhook secret",
                 "requestBody": {"required": True, "content": {"application/json": {"schema": {
                     "type": "object", "required": ["app_name", "category_id", "services_incl"],
                     "properties": _DETAILS}}}},
                 "responses": {"201": _ok("ProjectCreated", "created"), **_CPAAS_COMMON,
                               "409": _cpaas_error("a project with this app_name exists (1013)")}},
    },
    "/cpaas/projects/{app_id}": {
        "get": {"summary": "One project", "parameters": [_APP_ID],
                "responses": {"200": _ok("ProjectOne", "the project"), **_ONE}},
        "post": {"summary": "Edit the project's details", "parameters": [_APP_ID],
                 "requestBody": {"required": True, "content": {"application/json": {"schema": {
                     "type": "object", "properties": _DETAILS}}}},
                 "responses": {"200": _ok("ProjectOne", "the project"), **_ONE}},
    },
    "/cpaas/projects/{app_id}/reset_key": {
        "post": {"summary": "A new app_key; the old one stops working at once in every process", "parameters": [_APP_ID],
                 "responses": {"200": _ok("ProjectKey", "the new key, shown once"), **_ONE}},
    },
    "/cpaas/projects/{app_id}/voice": {
        "patch": {"summary": "Voice settings: in/out, inbound greeting and webhook, numbers, notification_url",
                  "parameters": [_APP_ID],
                  "requestBody": {"required": True, "content": {"application/json": {"schema": {
                      "type": "object", "properties": {
                          "in": {"type": "boolean"}, "out": {"type": "boolean"},
                          "inbound": {"type": "object", "properties": {
                              "event_url": {"type": "string"}, "welcome_text": {"type": "string", "maxLength": 500},
                              "voice_type": {"type": "string", "enum": ["female", "male"]},
                              "language": {"type": "string", "description": "a language prompts exist in (en-US)"},
                              "auto_record": {"type": "boolean"}}},
                          "phone": {"type": "array", "maxItems": 100, "items": _PHONE},
                          "notification_url": {"type": "string"},
                          "forward_pool": {"type": "string", "description": "this gateway's own: \"\" (rooms on "
                                           "Janus) or a [[forward_pools]] name (validated callers forwarded there)"}}}}}},
                  "responses": {"200": _ok("ProjectOne", "the project"), **_ONE,
                                "409": _cpaas_error("a number of another project (1010), or a setting the "
                                                    "configuration file holds (1011)")}},
    },
    "/cpaas/projects/{app_id}/video": {
        "patch": {"summary": "Video settings: notification_url (stored), phone (the numbers room pages show)",
                  "parameters": [_APP_ID],
                  "requestBody": {"required": True, "content": {"application/json": {"schema": {
                      "type": "object", "properties": {"notification_url": {"type": "string"},
                                                       "phone": {"type": "array", "maxItems": 100, "items": _PHONE}}}}}},
                  "responses": {"200": _ok("ProjectOne", "the project"), **_ONE}},
    },
})
OPENAPI["components"]["schemas"].update({
    "CpaasError": {"type": "object", "required": ["result", "error", "desc"], "properties": {
        "result": {"type": "integer", "enum": [0]}, "error": {"type": "integer"}, "desc": {"type": "string"},
        "field": {"type": "string"}}},
    "Project": {"type": "object", "required": ["app_id", "app_name", "voice", "video"], "properties": {
        "app_id": {"type": "string"}, "app_name": {"type": "string"}, "name": {"type": "string"},
        "category_id": {"type": "integer", "nullable": True}, "category": {"type": "string", "nullable": True},
        "short_desc": {"type": "string"}, "description": {"type": "string"},
        "services_incl": {"type": "array", "items": {"type": "string"}}, "created": {"type": "string"},
        "app_key_fingerprint": {"type": "string"}, "managed_by": {"type": "string", "enum": ["config", "api"]},
        "voice": {"type": "object"}, "video": {"type": "object"}}},
    "ProjectOne": {"type": "object", "required": ["result", "project"], "properties": {
        "result": {"type": "integer", "enum": [1]}, "project": {"$ref": "#/components/schemas/Project"}}},
    "ProjectPage": {"type": "object", "required": ["result", "projects", "search"], "properties": {
        "result": {"type": "integer", "enum": [1]},
        "projects": {"type": "array", "items": {"$ref": "#/components/schemas/Project"}},
        "search": {"type": "object", "required": ["page", "per_page", "total", "total_pages"]}}},
    "ProjectCreated": {"type": "object", "required": ["result", "app_id", "app_key", "project"], "properties": {
        "result": {"type": "integer", "enum": [1]}, "app_id": {"type": "string"}, "app_key": {"type": "string"},
        "webhook_secret": {"type": "string"}, "project": {"$ref": "#/components/schemas/Project"}}},
    "ProjectKey": {"type": "object", "required": ["result", "app_id", "app_key"], "properties": {
        "result": {"type": "integer", "enum": [1]}, "app_id": {"type": "string"}, "app_key": {"type": "string"}}},
})

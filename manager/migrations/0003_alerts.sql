-- mirage-manager schema, version 3: what the alert dispatcher (manager/src/alerts/) keeps per
-- message beyond version 1's alert_deliveries row.
--
-- Every detection a channel accepts ends up counted in exactly one row of alert_deliveries:
--   kind 'alert'   one message for one (rule, attacker address), covering `detection_count`
--                  detections that arrived together;
--   kind 'digest'  one message folding everything beyond the channel's hourly budget; while it
--                  is still collecting, `queued_at` is NULL (at most one such row per channel);
--   kind 'test'    a test message an admin sent (outside the budget);
--   status 'suppressed' rows record detections folded into an earlier alert of the same
--                  (rule, address) within the channel's de-duplication window (never sent).

ALTER TABLE alert_deliveries
    ADD COLUMN kind            text        NOT NULL DEFAULT 'alert'
                                           CHECK (kind IN ('alert', 'digest', 'test')),
    -- When the message took its place in the channel's hourly budget; NULL for suppressed and
    -- test rows and for a digest still collecting. The budget counts rows queued in the last hour.
    ADD COLUMN queued_at       timestamptz,
    -- When to (re)try sending; NULL: nothing to do (sent, suppressed, collecting, or given up).
    -- A sender claims a due row by moving this forward (a lease), so replicas never send twice.
    ADD COLUMN next_attempt_at timestamptz,
    -- The newest detection the message covers (no foreign key: retention may delete it, and the
    -- id is only a range bound).
    ADD COLUMN last_detection  bigint;

CREATE INDEX alert_deliveries_due ON alert_deliveries (next_attempt_at)
    WHERE next_attempt_at IS NOT NULL;
CREATE INDEX alert_deliveries_budget ON alert_deliveries (channel_id, queued_at)
    WHERE queued_at IS NOT NULL;
CREATE UNIQUE INDEX alert_deliveries_collecting ON alert_deliveries (channel_id)
    WHERE kind = 'digest' AND queued_at IS NULL AND status = 'pending';
CREATE INDEX alert_deliveries_id_channel ON alert_deliveries (channel_id, id);

COMMENT ON COLUMN alert_channels.config IS
    'email: {"host", "port", "tls": "none|starttls|tls", "username"?, "password"?, "from", "to": [...]}; '
    'webhook: {"url", "secret"?}; slack: {"url"}. Secrets are stored as given (they must be '
    'replayed to the SMTP server or used as the HMAC key) and redacted by the API.';

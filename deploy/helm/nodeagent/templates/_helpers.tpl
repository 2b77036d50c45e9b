{{- define "nodeagent.labels" -}}
app.kubernetes.io/name: nodeagent
app.kubernetes.io/part-of: nodeagent
{{- end -}}


{{- define "nodeagent.podSecurity" -}}
pod-security.kubernetes.io/enforce: privileged
pod-security.kubernetes.io/audit: privileged
pod-security.kubernetes.io/warn: privileged
{{- end -}}

{{- define "nodeagent.anchors" -}}
{{- required "identity.trustAnchorsPEM is empty: make it with `nodeagent identity init` (ca.crt)" .Values.identity.trustAnchorsPEM -}}
{{- end -}}

{{- define "nodeagent.issuerCrt" -}}
{{- required "identity.issuerCrtPEM is empty: make it with `nodeagent identity init` (issuer.crt)" .Values.identity.issuerCrtPEM -}}
{{- end -}}

{{- define "nodeagent.issuerKey" -}}
{{- required "identity.issuerKeyPEM is empty: make it with `nodeagent identity init` (issuer.key)" .Values.identity.issuerKeyPEM -}}
{{- end -}}

{{/* The ConfigMap's settings a running agent cannot take live (render.py's restart_keys) and the
Secret's data as sorted compact JSON, hashed (render.py's config_checksum). */}}
{{- define "nodeagent.checksum" -}}
{{- $config := dict -}}
{{- range $key, $value := pick .Values.config "fast-path" "mesh-label" "trust-domain" "workers" -}}
{{- $_ := set $config $key ($value | toString) -}}
{{- end -}}
{{- $secret := dict "ca.crt" (include "nodeagent.anchors" . | b64enc) "issuer.crt" (include "nodeagent.issuerCrt" . | b64enc) "issuer.key" (include "nodeagent.issuerKey" . | b64enc) -}}
{{- dict "config" $config "secret" $secret | toJson | sha256sum -}}
{{- end -}}

{{/* Seconds of config.drain-timeout (whole units: 90s, 10m, 1h), plus render.py's TERMINATION_MARGIN_S. */}}
{{- define "nodeagent.terminationGrace" -}}
{{- $d := index .Values.config "drain-timeout" | toString -}}
{{- $s := 0 -}}
{{- if hasSuffix "ms" $d -}}{{- $s = div (trimSuffix "ms" $d | atoi) 1000 -}}
{{- else if hasSuffix "h" $d -}}{{- $s = mul (trimSuffix "h" $d | atoi) 3600 -}}
{{- else if hasSuffix "m" $d -}}{{- $s = mul (trimSuffix "m" $d | atoi) 60 -}}
{{- else -}}{{- $s = trimSuffix "s" $d | atoi -}}
{{- end -}}
{{- add $s 30 -}}
{{- end -}}

{{/* The chart's name, or nameOverride. */}}
{{- define "finetune-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's full name: fullnameOverride; else <release> when it already contains the name,
     else <release>-<name>. */}}
{{- define "finetune-operator.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "finetune-operator.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "finetune-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "finetune-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "finetune-operator.labels" -}}
{{ include "finetune-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: finetune-operator
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* The trainer image: config.trainerImage, or the project's image at the chart's appVersion. */}}
{{- define "finetune-operator.trainerImage" -}}
{{- default (printf "ghcr.io/finetune-operator/finetune-trainer:%s" .Chart.AppVersion) .Values.config.trainerImage -}}
{{- end -}}

{{- define "finetune-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "finetune-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "finetune-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Label the sandbox namespaces carry (operator/finetune_operator/builders/names.py). */}}
{{- define "finetune-operator.sandboxLabel" -}}app.kubernetes.io/managed-by{{- end -}}

{{/* The cloud metadata ranges, as JSON: excepted from the operator's S3 egress as
     endpoints.METADATA_NETWORKS is from a sandbox's (test_chart_render.py keeps the two equal). */}}
{{- define "finetune-operator.metadataNetworks" -}}
["169.254.0.0/16", "100.100.100.200/32", "168.63.129.16/32", "fd00:ec2::254/128", "fd20:ce::254/128", "fe80::/10"]
{{- end -}}

{{/* An IP address as its bits: 32 characters 0 or 1 for IPv4, 128 for IPv6. Helm has no CIDR
     functions; comparing bit strings is how the chart decides that one range lies inside another. */}}
{{- define "finetune-operator.addressBits" -}}
{{- $address := lower . -}}
{{- if not (contains ":" $address) -}}
{{- range splitList "." $address }}{{ printf "%08b" (atoi .) }}{{ end -}}
{{- else -}}
{{- if contains "." $address }}{{ fail (printf "%s: write an IPv6 range in hexadecimal groups (no embedded IPv4)" .) }}{{ end -}}
{{- $halves := splitList "::" $address -}}
{{- $head := list }}{{ if first $halves }}{{ $head = splitList ":" (first $halves) }}{{ end -}}
{{- $tail := list }}{{ if and (gt (len $halves) 1) (last $halves) }}{{ $tail = splitList ":" (last $halves) }}{{ end -}}
{{- $groups := $head -}}
{{- range until (sub 8 (add (len $head) (len $tail)) | int) }}{{ $groups = append $groups "0" }}{{ end -}}
{{- $nibbles := dict "0" "0000" "1" "0001" "2" "0010" "3" "0011" "4" "0100" "5" "0101" "6" "0110" "7" "0111"
                     "8" "1000" "9" "1001" "a" "1010" "b" "1011" "c" "1100" "d" "1101" "e" "1110" "f" "1111" -}}
{{- range concat $groups $tail }}{{ range splitList "" (trunc -4 (printf "0000%s" .)) }}{{ get $nibbles . }}{{ end }}{{ end -}}
{{- end -}}
{{- end -}}

{{/* A range as its family and network bits ("4" or "6", then the first prefix-length bits of the
     address): one range lies inside another when its key starts with the other's. */}}
{{- define "finetune-operator.networkKey" -}}
{{- $parts := splitList "/" . -}}
{{- $bits := include "finetune-operator.addressBits" (first $parts) -}}
{{- ternary "6" "4" (contains ":" .) }}{{ trunc (ternary (last $parts | atoi) (len $bits) (gt (len $parts) 1)) $bits -}}
{{- end -}}

{{/* The ranges of .ranges that lie strictly inside .cidr, as a JSON list: what an ipBlock for .cidr
     must except (sandbox.s3_ip_block in Python; a range equal to the block or containing it stays). */}}
{{- define "finetune-operator.rangesInside" -}}
{{- $block := include "finetune-operator.networkKey" .cidr -}}
{{- $inside := list -}}
{{- range .ranges -}}
{{- $range := include "finetune-operator.networkKey" . -}}
{{- if and (hasPrefix $block $range) (gt (len $range) (len $block)) (not (has . $inside)) -}}
{{- $inside = append $inside . -}}
{{- end -}}
{{- end -}}
{{- toJson $inside -}}
{{- end -}}
